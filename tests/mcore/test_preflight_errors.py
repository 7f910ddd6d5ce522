"""Launch mistakes caught before any model is built: one line on stderr, exit code 2, no
traceback (each through the real CLI in a subprocess, plain ``python``, under a timeout)."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_hbp.configio import ConfigError, check_overrides
from megatron_hbp.mcore.config import TrainConfig
from megatron_hbp.planner.config import load_plan_config
from tests.distributed import run_command

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "examples" / "pretrain_llama_hbp.py"


@pytest.fixture(scope="module")
def demo_cfg(tmp_path_factory):
    """configs/demo_tiny.yaml with its outputs in a temporary folder (sample info and plan built
    once, by the first dry run)."""
    tmp = tmp_path_factory.mktemp("demo")
    cfg = yaml.safe_load((ROOT / "configs" / "demo_tiny.yaml").read_text())
    cfg["data"]["sample_info"] = str(tmp / "sample_info.npz")
    cfg["plan"]["path"] = str(tmp / "plan")
    cfg["plan"]["config"] = str(ROOT / "configs" / "plan_demo.yaml")
    cfg["checkpoint"]["dir"] = str(tmp / "ckpt")
    cfg["metrics_file"] = str(tmp / "metrics.jsonl")
    path = tmp / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(*args, timeout=300):
    return subprocess.run(
        [sys.executable, str(TRAIN), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def one_line_error(r):
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


def test_dry_run_with_plain_python(demo_cfg):
    r = train("--config", demo_cfg, "--dry-run")  # the demo plan is for 2 ranks: simulated
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[hbp] pre-flight ok: plan of" in r.stdout and "for 2 ranks" in r.stdout
    assert "torchrun --nproc-per-node 2" in r.stdout
    err = one_line_error(train("--config", demo_cfg, "--dry-run", "--nproc", 3))
    assert "is for 2 data x context ranks but this launch has 3" in err


@pytest.mark.parametrize(
    "override, expect",
    [
        ("attention_backend=varlen", "error: attention_backend=varlen needs CUDA"),
        ("attention_backend=te", "error: attention_backend=te needs CUDA"),
        ("cp_backend=te", "error: cp_backend 'te': Transformer Engine's context-parallel attention is not"),
        (
            "data.sample_info=/nonexistent/typo.npz",
            "error: --set data.sample_info=/nonexistent/typo.npz: no such file",
        ),
    ],
)
def test_preflight_mistakes(demo_cfg, override, expect):
    err = one_line_error(train("--config", demo_cfg, "--set", override, "--dry-run"))
    assert expect in err, err
    assert not Path("/nonexistent/typo.npz").exists()


def test_sample_info_elsewhere_on_purpose(tmp_path):
    from megatron_hbp.mcore.config import load_train_config
    from megatron_hbp.mcore.preflight_checks import check_sample_info_override

    cfg_path = ROOT / "configs" / "demo_tiny.yaml"
    ov = [f"data.sample_info={tmp_path / 'si.npz'}"]
    with pytest.raises(
        ConfigError, match="add --set data.build_if_missing=true to build it there on purpose"
    ):
        check_sample_info_override(cfg_path, ov, load_train_config(cfg_path, ov))
    ov.append("data.build_if_missing=true")
    check_sample_info_override(cfg_path, ov, load_train_config(cfg_path, ov))  # no error


def test_real_launch_stops_before_the_model(demo_cfg):
    # The bug: --dry-run said "pre-flight ok", then every rank died in the model build (97 lines).
    err = one_line_error(train("--config", demo_cfg, "--set", "attention_backend=varlen"))
    assert err.startswith("error: attention_backend=varlen needs CUDA")


@pytest.mark.parametrize(
    "override, expect",
    [
        ("seed=-1", "seed must be in [0, 2**32), got -1"),
        (
            "optimizer.lrr=1e-4",
            "error: --set optimizer.lrr=1e-4: unknown key 'optimizer.lrr' (did you mean 'optimizer.lr'?)",
        ),
        ("optimizer.lr=.nan", "error: --set optimizer.lr=.nan: nan is not a finite number"),
        ("memory_limit_gb=.inf", "error: --set memory_limit_gb=.inf: inf is not a finite number"),
        ("optimizer.clip_grad=-1.0", "error: --set optimizer.clip_grad=-1.0: -1.0 is negative"),
    ],
)
def test_config_mistakes(demo_cfg, capsys, override, expect):
    # Found while reading the config, before torch.distributed starts: the CLI's main() in-process.
    from megatron_hbp.mcore.train import main

    assert main(["--config", str(demo_cfg), "--set", override, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0], err


def test_fused_loss_on_cpu_warns_once(demo_cfg):
    r = train(
        "--config", demo_cfg, "--dry-run", "--set", "loss_impl=fused", "--set", "tensorboard_dir=/tmp/tb",
        "--set", "dtype=bf16",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("[hbp] WARNING loss_impl=fused on CPU") == 1
    # bf16 on CPU runs (issue 15 trains and resumes it on CPU) but is said once
    assert r.stdout.count("[hbp] WARNING dtype=bf16 on CPU") == 1


def test_yaml_exponent_floats_and_float_checks(tmp_path):
    # PyYAML (YAML 1.1) reads 5.7344e4 as a string: accepted for float fields.
    p = tmp_path / "p.yaml"
    p.write_text(
        "groups: [{pack_length: 16}]\nworld_size: 1\nmicro_batches_per_step: 1\ncost_linear_coef: 5.7344e4\n"
    )
    assert load_plan_config(p).cost_linear_coef == 57344.0
    for bad, what in (
        (".nan", "not a finite number"),
        (".inf", "not a finite number"),
        ("-1.5", "must be >= 0, got -1.5"),
    ):
        p.write_text(
            f"groups: [{{pack_length: 16}}]\nworld_size: 1\nmicro_batches_per_step: 1\ncost_linear_coef: {bad}\n"
        )
        with pytest.raises(ConfigError, match=rf"p\.yaml(\.cost_linear_coef)?: .*{what}"):
            load_plan_config(p)
    p.write_text("groups: [{pack_length: 16}]\nworld_size: 1\nmicro_batches_per_step: 1\nseed: -1\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: plan config: seed must be >= 0"):
        load_plan_config(p)


def test_check_overrides():
    check_overrides(TrainConfig, ["optimizer.lr=5.7344e4", "plan.overrides.anything=1", "max_steps=3"])
    with pytest.raises(ConfigError, match=r"^--set data\.sample_info\.x=1: 'data\.sample_info' is a value"):
        check_overrides(TrainConfig, ["data.sample_info.x=1"])
    with pytest.raises(ConfigError, match=r"^--set max_steps=three: expected int, got str"):
        check_overrides(TrainConfig, ["max_steps=three"])
    with pytest.raises(ConfigError, match=r"^--set seedd=1: unknown key 'seedd' \(did you mean 'seed'\?\)"):
        check_overrides(TrainConfig, ["seedd=1"])


@pytest.mark.slow  # a 2-rank torchrun launch (~20 s on 2 cores)
def test_import_warnings_printed_once_by_rank_0(demo_cfg):
    # Megatron's TE/Apex/deprecation warnings used to be printed by every rank.
    import collections

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(TRAIN),
           "--config", str(demo_cfg), "--dry-run"]  # fmt: skip
    env = {"PYTHONWARNINGS": None}  # the warnings are what is counted
    r = run_command(cmd, timeout=300, env=env)
    warned = collections.Counter(ln for ln in (r.stdout + r.stderr).splitlines() if "UserWarning" in ln)
    assert warned and set(warned.values()) == {1}, warned
    # A config mistake: one error line for the launch, not one per rank.
    r = run_command(cmd + ["--set", "attention_backend=varlen"], timeout=300, env=env, check=False)
    # (torchrun prints its own ChildFailedError traceback; none comes from our code)
    assert (
        r.returncode != 0
        and "megatron_hbp/" not in r.stderr
        and 'pretrain_llama_hbp.py", line' not in r.stderr
    )
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("error:")] == [
        "error: attention_backend=varlen needs CUDA (this launch has no GPU); use attention_backend: auto or sdpa"
    ]


def test_negative_float_without_its_own_check(tmp_path):
    from megatron_hbp.mcore.config import load_train_config

    cfg = yaml.safe_load((ROOT / "configs" / "demo_tiny.yaml").read_text())
    cfg["optimizer"]["clip_grad"] = -1.0
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(cfg))
    with pytest.raises(
        ConfigError, match=r"run\.yaml\.optimizer\.clip_grad: -1\.0 is negative; give a value >= 0"
    ):
        load_train_config(p)
