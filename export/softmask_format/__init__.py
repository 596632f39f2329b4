"""softmask_format: the on-disk contract shared by `softmask_peft` (torch) and `softmask_edge` (device).

Standard library and numpy only, so the device side can import it without torch:
`atomic` (atomic writes, staged multi-file commits), `codec` (importance storage dtypes),
`keys` (the importance key scheme), `names` (file names and format versions),
`version` (the one version string of the distribution).
"""

from .version import __version__

__all__ = ["__version__"]
