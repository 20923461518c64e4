"""Hardware specs and the cost model: how long decode steps, prefills, learner steps and syncs take."""

from sim.hardware.cost import CostModel, build_cost_model
from sim.hardware.specs import GPUS, MODELS

__all__ = ["CostModel", "GPUS", "MODELS", "build_cost_model"]
