"""Training objectives sharing one contract (:class:`Objective`): ``loss(student, batch, step) -> (loss, logs)``."""
from .base import AdaptiveWeight, Objective, PhaseModels, config_from_dict
from .flow_matching import FMConfig, FlowMatchingObjective
from .diffusion_forcing import DiffusionForcingConfig, DiffusionForcingObjective
from .dcm import DCMConfig, DCMObjective
from .scm import SCMConfig, SCMObjective
from .meanflow import MeanFlowConfig, MeanFlowObjective, MeanFlowNet, TFMeanFlowNet
from .dmd import DMDConfig, SelfForcingDMD
from .rcm import RCMConfig, RCMObjective
from .ode_regression import ODERegressionConfig, ODERegressionObjective
