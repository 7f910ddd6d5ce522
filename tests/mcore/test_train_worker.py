"""Multi-process scenarios for tests/mcore/test_train_dist.py (not a test module itself).

Run as N ranks by ``tests.distributed.run_ranks`` (or ``torchrun --nproc-per-node N
tests/mcore/test_train_worker.py WORKDIR SCENARIO...``, or a plain ``python`` for one process). Each scenario trains from the files prepared by
``tests/mcore/test_train_dist.py`` in WORKDIR and writes ``WORKDIR/result_<scenario>.json`` (and
``.pt`` gradients) on rank 0. One launch runs several scenarios to share the ~6 s import
cost. Only stdlib imports at module level: pytest imports this file while collecting.
"""

import json
import sys
from dataclasses import replace
from pathlib import Path


def _cfg(work: Path, plan: str, **kw):
    from megatron_hbp.mcore.config import (
        CheckpointConfig,
        DataConfig,
        OptimizerConfig,
        PlanSource,
        TrainConfig,
    )

    data_kw = kw.pop("data", {})
    return TrainConfig(
        model=kw.pop("model", "tiny"),
        data=DataConfig(sample_info=str(work / "info.npz"), num_workers=kw.pop("num_workers", 0), **data_kw),
        plan=PlanSource(path=str(work / plan)),
        optimizer=OptimizerConfig(lr=1e-3, warmup_steps=2, clip_grad=1.0),
        checkpoint=kw.pop("checkpoint", CheckpointConfig()),
        dtype="fp32",
        **kw,
    )


def _grab_grads(store: dict, steps=(0, 1)):
    import torch

    def hook(step, model):
        if step not in steps:
            return
        store[step] = {
            name: (p.main_grad if getattr(p, "main_grad", None) is not None else p.grad).detach().clone()
            for name, p in model.module.named_parameters()
        }
        store.setdefault("_n", torch.tensor(0))

    return hook


def _manual_loss(model, work: Path, plan_file: str, step_index: int, mode: str) -> float:
    """Independent loss of a plan step: plain logits + F.cross_entropy, normalised by hand."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from megatron_hbp import load_plan
    from megatron_hbp.data import SFTDataset
    from megatron_hbp.mcore.attention import HBPPackedSeqParams

    plan = load_plan(work / plan_file)
    ds = SFTDataset(str(work / "info.npz"))
    step = plan.step(step_index)
    num = 0.0
    den = 0
    for rep in step.replicas:
        for mb in rep.micro_batches:
            mb_sum, mb_tok = 0.0, 0
            for pack in mb.packs:
                ids, masks = [], []
                for i in pack.sample_indices.tolist():
                    s = ds[i]
                    ids.append(np.asarray(s.input_ids, np.int64))
                    masks.append(np.asarray(s.loss_mask))
                tokens = torch.from_numpy(np.concatenate(ids))[None]
                pos = torch.cat([torch.arange(len(x)) for x in ids])
                lens = [len(x) for x in ids]
                cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)
                params = HBPPackedSeqParams(
                    qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                    cu_seqlens_kv_padded=cu, max_seqlen_q=max(lens), max_seqlen_kv=max(lens),
                    position_ids=pos, padded_lengths_host=lens, lengths_host=lens,
                )  # fmt: skip
                with torch.no_grad():
                    logits = model(tokens, None, None, packed_seq_params=params)[0].float()
                start = 0
                for x, m in zip(ids, masks):
                    n = len(x)
                    ce = F.cross_entropy(
                        logits[start : start + n - 1], torch.from_numpy(x[1:]), reduction="none"
                    )
                    w = torch.from_numpy((m[1:] > 0).astype(np.float32))
                    s_sum, s_tok = float((ce * w).sum()), int(w.sum())
                    if mode == "sample_mean" and s_tok:
                        num += s_sum / s_tok
                        den += 1
                    mb_sum += s_sum
                    mb_tok += s_tok
                    start += n
            if mode == "step_token_mean":
                num += mb_sum
                den += mb_tok
            elif mode == "micro_batch_mean" and mb_tok:
                num += mb_sum / mb_tok
                den += 1
    return num / den


def _model_isolation(model) -> dict:
    """Whole-model check: change every token of document 1 of a 3-document pack; the logits
    of documents 0 and 2 must not change at all, those of document 1 must."""
    import torch

    from megatron_hbp.mcore.attention import HBPPackedSeqParams

    lens = [7, 5, 9]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 32000, (1, sum(lens)), generator=g)
    cu = torch.tensor([0, 7, 12, 21], dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lens])
    params = HBPPackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu, cu_seqlens_kv_padded=cu,
        max_seqlen_q=9, max_seqlen_kv=9, position_ids=pos, padded_lengths_host=lens, lengths_host=lens,
    )  # fmt: skip
    with torch.no_grad():
        base = model(tokens, None, None, packed_seq_params=params)[0]
        t2 = tokens.clone()
        t2[0, 7:12] = (t2[0, 7:12] + 1234) % 32000
        pert = model(t2, None, None, packed_seq_params=params)[0]
        # document 2 alone (positions from 0) gives the same logits as inside the pack
        cu1 = torch.tensor([0, 9], dtype=torch.int32)
        p1 = HBPPackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu1, cu_seqlens_kv=cu1, cu_seqlens_q_padded=cu1, cu_seqlens_kv_padded=cu1,
            max_seqlen_q=9, max_seqlen_kv=9, position_ids=torch.arange(9), padded_lengths_host=[9], lengths_host=[9],
        )  # fmt: skip
        alone = model(tokens[:, 12:], None, None, packed_seq_params=p1)[0]
    return {
        "others_equal": bool(torch.equal(base[:7], pert[:7]) and torch.equal(base[12:], pert[12:])),
        "doc1_changed": bool(not torch.allclose(base[7:12], pert[7:12])),
        "alone_max_abs_diff": float((alone - base[12:]).abs().max()),
    }


def scenario_single(work: Path, rank: int) -> dict:
    """1 process, 4 micro-batches per step (plan_w1): losses, grads, and the manual loss."""
    import torch

    from megatron_hbp.mcore.train import run

    grads, manual = {}, {}

    def hook(step, model):
        _grab_grads(grads)(step, model)
        if step == 0:
            manual["isolation"] = _model_isolation(model.module)
            manual["step_token_mean"] = _manual_loss(model.module, work, "plan_w1.npz", 0, "step_token_mean")
            manual["sample_mean"] = _manual_loss(model.module, work, "plan_w1.npz", 0, "sample_mean")
            manual["micro_batch_mean"] = _manual_loss(
                model.module, work, "plan_w1.npz", 0, "micro_batch_mean"
            )

    recs = run(_cfg(work, "plan_w1.npz", max_steps=2), on_grads=hook)
    torch.save({k: v for k, v in grads.items() if k != "_n"}, work / "grads_single.pt")
    fused_grads = {}
    fused = run(_cfg(work, "plan_w1.npz", max_steps=2, loss_impl="fused"), on_grads=_grab_grads(fused_grads))
    torch.save({k: v for k, v in fused_grads.items() if k != "_n"}, work / "grads_fused.pt")
    other = {}
    for mode in ("sample_mean", "micro_batch_mean"):
        other[mode] = run(_cfg(work, "plan_w1.npz", max_steps=1, loss_normalization=mode))[0]["loss"]
    return {
        "losses": [r["loss"] for r in recs],
        "losses_fused": [r["loss"] for r in fused],
        "manual": manual,
        "other_modes": other,
        "records": recs,
    }


def scenario_token_files(work: Path, rank: int) -> dict:
    """The same 2 steps trained from the token files (info.npz) and from the JSONL (info_jsonl.npz:
    the same sample info, built with tokens=False): losses and gradients must be bitwise equal."""
    import torch

    from megatron_hbp.mcore.train import run

    out, grads = {}, {}
    for name, info in (("tokens", "info.npz"), ("jsonl", "info_jsonl.npz")):
        cfg = _cfg(work, "plan_w1.npz", max_steps=2)
        cfg = replace(cfg, data=replace(cfg.data, sample_info=str(work / info)))
        grads[name] = {}
        out[f"losses_{name}"] = [r["loss"] for r in run(cfg, on_grads=_grab_grads(grads[name]))]
    g1, g2 = grads["tokens"], grads["jsonl"]
    out["grads_compared"] = sum(len(g1[s]) for s in (0, 1))
    out["grads_equal"] = all(torch.equal(g1[s][k], g2[s][k]) for s in (0, 1) for k in g1[s])
    out["token_files"] = [(work / f).exists() for f in ("info.tokens.json", "info_jsonl.tokens.json")]
    return out


def scenario_rerun(work: Path, rank: int) -> dict:
    """Two run()s in one process with Python's automatic collector off: the first run's model
    must be gone once the second has run (run() frees an earlier run's cyclic garbage)."""
    import gc

    from megatron.core.models.gpt import GPTModel

    from megatron_hbp.mcore.train import run

    gc.collect()
    gc.disable()
    try:
        run(_cfg(work, "plan_w1.npz", max_steps=1))
        after_first = sum(isinstance(o, GPTModel) for o in gc.get_objects())
        run(_cfg(work, "plan_w1.npz", max_steps=1))
        after_second = sum(isinstance(o, GPTModel) for o in gc.get_objects())
    finally:
        gc.enable()
    gc.collect()
    return {
        "after_first": after_first,
        "after_second": after_second,
        "after_collect": sum(isinstance(o, GPTModel) for o in gc.get_objects()),
    }


def scenario_stable2(work: Path, rank: int) -> dict:
    """2 processes, 2 micro-batches each (plan_w2: the same packs as plan_w1)."""
    import torch

    from megatron_hbp.mcore.train import run

    grads = {}
    recs = run(_cfg(work, "plan_w2.npz", max_steps=2, num_workers=1), on_grads=_grab_grads(grads))
    if rank == 0:
        torch.save({k: v for k, v in grads.items() if k != "_n"}, work / "grads_stable2.pt")
    return {"losses": [r["loss"] for r in recs], "records": recs}


def scenario_resume(work: Path, rank: int) -> dict:
    """10 steps straight vs 5 steps + resume to 10 (plan_resume, 2 ranks)."""
    from megatron_hbp.mcore.config import CheckpointConfig
    from megatron_hbp.mcore.train import run

    straight = run(_cfg(work, "plan_resume.npz", max_steps=10))
    ck = CheckpointConfig(dir=str(work / "ckpt_resume"), save_interval=5)
    first = run(_cfg(work, "plan_resume.npz", max_steps=5, checkpoint=ck))
    ck2 = replace(ck, load=str(work / "ckpt_resume"))
    second = run(
        _cfg(work, "plan_resume.npz", max_steps=10, checkpoint=ck2, metrics_file=str(work / "m.jsonl"))
    )
    return {
        "straight": [r["loss"] for r in straight],
        "first": [r["loss"] for r in first],
        "second": [r["loss"] for r in second],
        "second_steps": [r["step"] for r in second],
        "grad_norms_straight": [r["grad_norm"] for r in straight],
        "grad_norms_second": [r["grad_norm"] for r in second],
    }


def scenario_resume_distopt(work: Path, rank: int) -> dict:
    """The same with Megatron's distributed optimizer (sharded Adam states): 4 straight vs 2 + 2."""
    from megatron_hbp.mcore.config import CheckpointConfig
    from megatron_hbp.mcore.train import run

    def cfg(**kw):
        c = _cfg(work, "plan_resume.npz", **kw)
        return replace(c, optimizer=replace(c.optimizer, use_distributed_optimizer=True))

    straight = run(cfg(max_steps=4))
    ck = CheckpointConfig(dir=str(work / "ckpt_distopt"), save_interval=2)
    run(cfg(max_steps=2, checkpoint=ck))
    second = run(cfg(max_steps=4, checkpoint=replace(ck, load=str(work / "ckpt_distopt" / "step_2"))))
    return {"straight": [r["loss"] for r in straight], "second": [r["loss"] for r in second]}


def scenario_tp2(work: Path, rank: int) -> dict:
    """TP = 2 on 2 processes with the 1-rank plan: must match the single-process run."""
    from megatron_hbp.mcore.config import ParallelConfig
    from megatron_hbp.mcore.train import run

    recs = run(_cfg(work, "plan_w1.npz", max_steps=2, parallel=ParallelConfig(tp=2)))
    fused = run(_cfg(work, "plan_w1.npz", max_steps=2, parallel=ParallelConfig(tp=2), loss_impl="fused"))
    return {
        "losses": [r["loss"] for r in recs],
        "grad_norms": [r["grad_norm"] for r in recs],
        "losses_fused": [r["loss"] for r in fused],
        "grad_norms_fused": [r["grad_norm"] for r in fused],
    }


def scenario_bad(work: Path, rank: int) -> dict:
    """Each bad input must raise TrainSetupError before training; record the messages."""
    from megatron_hbp.mcore.config import CheckpointConfig
    from megatron_hbp.mcore.train import TrainSetupError, run

    cases = {
        "world_size": _cfg(work, "plan_w1.npz"),
        "missing_file": replace(_cfg(work, "plan_w2.npz"), data=replace(_cfg(work, "x").data, sample_info=str(work / "bad_missing" / "info.npz"))),
        "changed_data": replace(
            _cfg(work, "bad_changed/plan.npz"),
            data=replace(_cfg(work, "x").data, sample_info=str(work / "bad_changed" / "info.npz")),
        ),
        "unknown_preset": _cfg(work, "plan_w2.npz", model="no_such_model"),
        "oom": _cfg(work, "plan_w2.npz", memory_limit_gb=0.01),
        "no_sample_info": replace(_cfg(work, "plan_w2.npz"), data=replace(_cfg(work, "x").data, sample_info=str(work / "nope.npz"))),
        "checkpoint_other_plan": _cfg(work, "plan_w2.npz", checkpoint=CheckpointConfig(load=str(work / "ckpt_resume"))),
        "lengths_plan_fewer_samples": _cfg(work, "plan_lengths_fewer.npz"),
        "lengths_plan_other_lengths": _cfg(work, "plan_lengths_other.npz"),
        "plan_loss_tokens": _cfg(work, "plan_w2_bad_loss.npz", max_steps=1),  # raises after step 0, both ranks
    }  # fmt: skip
    out = {}
    for name, cfg in cases.items():
        try:
            run(cfg, on_grads=None)
            out[name] = {"raised": False, "message": ""}
        except TrainSetupError as e:
            out[name] = {"raised": True, "type": "TrainSetupError", "message": str(e)}
        except Exception as e:  # a wrong exception type is a test failure, recorded as such
            out[name] = {"raised": True, "type": type(e).__name__, "message": str(e)}
    return out


SCENARIOS = {
    "rerun": scenario_rerun,
    "token_files": scenario_token_files,
    "single": scenario_single,
    "stable2": scenario_stable2,
    "resume": scenario_resume,
    "resume_distopt": scenario_resume_distopt,
    "tp2": scenario_tp2,
    "bad": scenario_bad,
}


def run_scenarios(argv, scenarios: dict) -> None:
    """argv: WORKDIR SCENARIO...: run each scenario on this rank, rank 0 writes
    ``WORKDIR/result_<scenario>.json`` (an exception is recorded, the next scenario still runs)."""
    work = Path(argv[0])
    from megatron_hbp.mcore.train import init_distributed

    rank, _, _ = init_distributed()
    for name in argv[1:]:
        try:
            result = scenarios[name](work, rank)
        except Exception as e:  # record and go on: other scenarios still report
            import traceback

            result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        if rank == 0:
            (work / f"result_{name}.json").write_text(json.dumps(result, default=str))
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main(argv):
    run_scenarios(argv, SCENARIOS)


if __name__ == "__main__":
    main(sys.argv[1:])
