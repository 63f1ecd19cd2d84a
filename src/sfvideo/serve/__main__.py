from sfvideo.serve.command import main

main()
