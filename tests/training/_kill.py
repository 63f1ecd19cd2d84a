"""Test-only callback: SIGKILL the whole run (both ranks) right after a given critic step."""

import os
import signal

import lightning as L


class KillAfterCriticStep(L.Callback):
    def __init__(self, critic_step: int) -> None:
        self.critic_step = critic_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if module.critic_steps == self.critic_step:
            # The test starts the run in its own session: the group is the launcher and its spawned ranks.
            os.killpg(os.getpgrp(), signal.SIGKILL)
