"""Teacher-forcing training objectives sharing one interface: ``loss(student, batch, step) -> (loss, logs)``."""
from .base import Objective, TFContext, AdaptiveWeight
from .flow_matching import FMConfig, FlowMatchingObjective
from .dcm import DCMConfig, DCMObjective
from .scm import SCMConfig, SCMObjective
from .meanflow import MeanFlowConfig, MeanFlowObjective, MeanFlowNet, TFMeanFlowNet
