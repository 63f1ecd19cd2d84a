"""The ODE-pairs file format moved to :mod:`sfvideo.data.ode_pairs` (trajectories are data: the TF/DF data module
reads them too); these names stay importable from here."""

from sfvideo.data.ode_pairs import (
    CAUSVID_ODE,
    ODE_PAIRS_FORMAT,
    ODE_PAIRS_INDEX,
    ODEPairs,
    check_euler,
    generate_ode_pairs,
    load_ode_pairs,
    write_ode_pairs,
)

__all__ = [
    "CAUSVID_ODE",
    "ODE_PAIRS_FORMAT",
    "ODE_PAIRS_INDEX",
    "ODEPairs",
    "check_euler",
    "generate_ode_pairs",
    "load_ode_pairs",
    "write_ode_pairs",
]
