"""ParallelConfig / validate_parallel: bad layouts fail early with a ConfigError naming the key."""
import pytest

from megatron_rcm.config.errors import ConfigError
from megatron_rcm.config.model import model_preset
from megatron_rcm.parallel import ParallelConfig, validate_parallel


def test_dp_auto_and_product():
    assert ParallelConfig(tp=2, cp=2).resolved(8).dp == 2
    assert ParallelConfig(tp=2, dp=2).resolved(4).dp == 2
    with pytest.raises(ConfigError, match="parallel.dp"):
        ParallelConfig(tp=2, dp=3).resolved(4)
    with pytest.raises(ConfigError, match=r"parallel.tp\*cp\*pp"):
        ParallelConfig(tp=3).resolved(4)
    with pytest.raises(ConfigError, match="parallel.tp"):
        ParallelConfig(tp=0).resolved(4)


def test_model_dependent_checks():
    cfg = model_preset("tiny")  # 4 heads, ffn 256, 4 layers
    validate_parallel(ParallelConfig(tp=2, cp=2, dp=1), cfg, num_frames=4, chunk_frames=2)
    with pytest.raises(ConfigError, match=r"parallel.tp\*cp") as e:
        validate_parallel(ParallelConfig(tp=4, cp=2, dp=1), cfg)
    assert e.value.key == "parallel.tp*cp"
    with pytest.raises(ConfigError, match="parallel.cp"):
        validate_parallel(ParallelConfig(cp=2, dp=1), cfg, num_frames=3)
    with pytest.raises(ConfigError, match="chunk_frames"):
        validate_parallel(ParallelConfig(cp=2, dp=1), cfg, chunk_frames=1)
    with pytest.raises(ConfigError, match="parallel.pp"):
        validate_parallel(ParallelConfig(pp=3, dp=1), cfg)


def test_fsdp_and_schedule_options_are_checked():
    cfg = ParallelConfig(tp=2, fsdp=True, fsdp_param_dtype="bfloat16", fsdp_reduce_dtype="float32", pp_schedule="gpipe")
    assert cfg.resolved(4) == ParallelConfig(tp=2, dp=2, fsdp=True, fsdp_param_dtype="bfloat16",
                                             fsdp_reduce_dtype="float32", pp_schedule="gpipe")
    for key, bad in (("fsdp_teacher", "half"), ("fsdp_param_dtype", "bf16"), ("fsdp_reduce_dtype", "int8"),
                     ("pp_schedule", "interleaved")):
        with pytest.raises(ConfigError, match=f"parallel.{key}"):
            ParallelConfig(**{key: bad}).resolved(1)
