"""Source-free domain adaptation methods (each module registers one method)."""
from . import aad, adabn, adacontrast, ccl, cowa, impressions, nrc, plue, sfda2, shot, shot_im, source_only, tent, threec_gan  # noqa: F401
from .common import clustering_pseudo_labels, propagate_labels  # noqa: F401
from .selection import select_epoch  # noqa: F401
