from milora_vlm.analysis.walk import *  # noqa: F401,F403  (split into one module per concept in the next commit)
from milora_vlm.analysis.walk import IGNORE_INDEX  # noqa: F401
