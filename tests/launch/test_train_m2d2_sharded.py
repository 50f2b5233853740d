"""launch/train_m2d2.py under FSDP2 (torchrun --fsdp), DeepSpeed ZeRO-2/3 (the deepspeed launcher)
and two torchrun "nodes" on localhost, on CPU with gloo: every run's final/ weights equal the
single-process run's (same seed, same global batch), a resumed run equals the uninterrupted one
(also after a kill -9 in the middle of a checkpoint write). --fsdp under the deepspeed launcher
is checked in-process in test_train_m2d2_errors.py (the launcher's --local_rank flag).

Tolerance (fp32, derived; see `assert_matches`):
* every tensor: max|w - w_ref| <= RTOL * max|w_ref| with RTOL = 1e-5. Ranks sum the same
  gradients in another order, which changes them by O(sqrt(n) u) relatively (u = 2^-24 = 6e-8,
  so ~1e-6 for the sums here); Adam's per-element normalisation passes that relative error on to
  each update (of size <= lr), so after the run the weights differ by <= sum_t lr_t * 1e-6 ~ 2e-9
  plus a few ulps of fp32 rounding of the weights themselves; relative to a tensor's largest entry
  (>= ~sum lr for the zero-initialised biases) that is <= ~2e-6. Observed: <= 5e-7.
* the attention key bias (the middle third of each `c_attn.bias`) cannot change the loss (it adds
  one constant to every score of a query, which softmax removes), so its gradient is fp32
  rounding noise (measured ~5e-12 on this model; bounded here by G = 1e-10) and Adam amplifies
  noise below its eps: each update is ~ lr * g / eps. Two runs differ there by at most
  2 * sum_t lr_t * G / eps = 4e-5 (eps = 1e-8, sum lr = 2e-3). Compared with that bound, not
  excluded. Observed: <= 1.1e-7.

Runtime on 2 shared CPU cores: about 2-3 minutes (DeepSpeed processes start slowly).
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "launch" / "train_m2d2.py")
BIN = Path(sys.executable).parent
STEPS = 4
LRS = [0.0, 1e-3, 2e-3 / 3, 1e-3 / 3]  # warmup 1 step, then linear decay to ~0 at step 4 (lr 1e-3)
RTOL = 1e-5
ADAM_EPS = 1e-8
KEY_BIAS_GRAD = 1e-10  # bound on the key bias's rounding-noise gradient (measured ~5e-12)
KEY_BIAS_ATOL = 2 * sum(LRS) * KEY_BIAS_GRAD / ADAM_EPS
N_EMBD = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A 2-layer GPT-2 folder without dropout (so that every world size draws the same
    computation) and the single-process reference run."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tram_dist.data import load_tokenizer

    w = tmp_path_factory.mktemp("sharded")
    tok = load_tokenizer(None)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=N_EMBD, n_layer=2, n_head=2,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(cfg).save_pretrained(w / "model")
    tok.save_pretrained(w / "model")
    launch([sys.executable, SCRIPT], w, "single")
    return w


def env(w: Path) -> dict:
    return {**os.environ, "TRAM_DIST_CACHE": str(w / "cache"), "CUDA_VISIBLE_DEVICES": "",
            "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def flags(w: Path, out: str, *extra) -> list:
    return ["--config", str(ROOT / "configs" / "tiny.yaml"), "--model", str(w / "model"),
            "--batch-size", "4", "--block-size", "32", "--eval-batch-size", "64", "--warmup-steps", "1",
            "--eval-domains", "math", "--eval-interval", "0", "--max-steps", str(STEPS),
            "--output-dir", str(w / out), *extra]


def launch(prefix: list, w: Path, out: str, *extra, ok: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([*prefix, *flags(w, out, *extra)], cwd=ROOT, env=env(w), capture_output=True,
                       text=True, timeout=300)
    assert (r.returncode == 0) == ok, (r.returncode, r.stdout[-2000:], r.stderr[-4000:])
    return r


def torchrun(nproc: int = 2) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), SCRIPT]


def deepspeed(nproc: int = 2) -> list:
    return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()), SCRIPT]


def weights(w: Path, out: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(w / out / "final" / "model.safetensors"))


def metrics(w: Path, out: str) -> list:
    return [json.loads(x) for x in (w / out / "metrics.jsonl").read_text().splitlines()]


def assert_matches(w: Path, out: str, ref: str = "single") -> float:
    """final/ of `out` against `ref` within the tolerance derived in the module docstring;
    returns the largest difference relative to the tensor's largest entry."""
    a, b = weights(w, out), weights(w, ref)
    assert set(a) == set(b) and a, sorted(set(a) ^ set(b))
    worst = 0.0
    for name, ref_t in b.items():
        t = a[name]
        assert t.dtype == torch.float32 and t.shape == ref_t.shape, name
        diff = (t.double() - ref_t.double()).abs()
        scale = ref_t.double().abs()
        if name.endswith("attn.c_attn.bias"):  # [query | key | value]
            key = slice(N_EMBD, 2 * N_EMBD)
            assert float(diff[key].max()) <= KEY_BIAS_ATOL, (name, float(diff[key].max()))
            diff, scale = diff.clone(), scale.clone()
            diff[key] = 0
            scale[key] = 0
        rel = float(diff.max() / scale.max())
        assert rel <= RTOL, (name, rel)
        worst = max(worst, rel)
    return worst


def resolved(w: Path, out: str) -> str:
    return (w / out / "config.yaml").read_text()


def test_fsdp2_matches_single_process_and_resumes_exactly(work):
    launch(torchrun(), work, "fsdp", "--fsdp", "--save-interval", "2")
    assert "engine: fsdp" in resolved(work, "fsdp") and "world_size: 2" in resolved(work, "fsdp")
    assert assert_matches(work, "fsdp") < RTOL
    ckpt = work / "fsdp" / "checkpoint-00000002"
    assert (ckpt / "dcp" / ".metadata").is_file() and (ckpt / "rng_rank1.pt").is_file()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work / "fsdp" / "final")  # a plain HF folder
    assert model.config.architectures == ["GPT2LMHeadModel"] and model.dtype == torch.float32

    # resume at step 2: steps 3 and 4 (data, lr schedule, TRAM target, optimizer) repeat exactly
    launch(torchrun(), work, "fsdp-resumed", "--fsdp", "--resume", str(ckpt))
    full, again = metrics(work, "fsdp"), metrics(work, "fsdp-resumed")
    assert [m["step"] for m in again] == [3, 4]
    for x, y in zip(full[2:], again):
        for key in ("loss", "perturbed_loss", "divergence", "lr", "clip_norm"):
            assert x[key] == y[key], (key, x[key], y[key])
    a, b = weights(work, "fsdp-resumed"), weights(work, "fsdp")
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_single_process(work, stage):
    out = f"zero{stage}"
    # ZeRO-3: configs/zero3_offload.json (optimizer and parameters offloaded to the CPU) and a
    # checkpoint to resume; ZeRO-2: configs/zero2.json and the Table 5 analysis under DeepSpeed
    preset = ROOT / "configs" / ("zero3_offload.json" if stage == 3 else "zero2.json")
    extra = ["--save-interval", "2"] if stage == 3 else ["--analysis"]
    r = launch(deepspeed(), work, out, "--deepspeed", str(preset), *extra)
    assert (r.stdout + r.stderr).count("done: ") == 1
    cfg = resolved(work, out)
    assert "engine: deepspeed" in cfg and "world_size: 2" in cfg
    # ZeRO-3 builds the model partitioned (deepspeed.zero.Init) and loads the folder's weights
    # into the partitions: the comparison with the single process below checks the loading
    assert f"model_built_partitioned: {'true' if stage == 3 else 'false'}" in cfg
    ds = json.loads((work / out / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == stage and ds["bf16"]["enabled"] is False
    assert ("offload_optimizer" in ds["zero_optimization"]) == (stage == 3)
    # clipping (the preset's max_grad_norm 1.0) happens once, in the TRAM step: metrics report it
    assert ds["gradient_clipping"] == 0.0 and "max_grad_norm: 1.0" in cfg
    rows = metrics(work, out)
    assert all(m["clip_norm"] is not None for m in rows) and max(m["clip_norm"] for m in rows) > 1.0
    assert [m["lr"] for m in rows] == pytest.approx(LRS, rel=1e-3, abs=1e-9)
    assert assert_matches(work, out) < RTOL
    if stage == 2:
        analysis = json.loads((work / out / "eval.json").read_text())["analysis"]
        assert analysis["sharpness"]["math"] > 0 and 0.9 < analysis["cka"]["math"] <= 1 + 1e-6, analysis
    if stage == 3:  # resume the ZeRO-3 run at step 2 (DeepSpeed folder + per-rank TRAM files)
        ckpt = work / out / "checkpoint-00000002"
        assert (ckpt / "zero" / "tram_rank00001.pt").is_file()
        launch(deepspeed(), work, "zero3-resumed", "--deepspeed", str(preset), "--resume", str(ckpt))
        assert [m["lr"] for m in metrics(work, "zero3-resumed")] == [m["lr"] for m in rows[2:]]
        a, b = weights(work, "zero3-resumed"), weights(work, out)
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_two_nodes_one_process_each(work):
    """torchrun --nnodes 2 --node_rank R --rdzv-endpoint 127.0.0.1:PORT, one process per "node"."""
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(r),
         "--nproc_per_node", "1", "--rdzv-endpoint", f"127.0.0.1:{port}", SCRIPT, *flags(work, "nodes")],
        cwd=ROOT, env=env(work), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [x[-3000:] for x in logs]
    assert "engine: ddp" in resolved(work, "nodes") and "world_size: 2" in resolved(work, "nodes")
    assert sum(x.count("done: ") for x in logs) == 1
    assert assert_matches(work, "nodes") < RTOL


KILLER = '''
import os, runpy, signal, sys
from pathlib import Path
import tram_dist.run.checkpoints as ckpt
real = ckpt.write_manifest
def write_manifest_then_die(folder):
    if Path(folder).name == ".checkpoint-00000004.tmp":  # every engine file written, no manifest yet
        os.kill(os.getpid(), signal.SIGKILL)
    real(folder)
ckpt.write_manifest = write_manifest_then_die
sys.argv[0] = {script!r}
runpy.run_path({script!r}, run_name="__main__")
'''


@pytest.mark.parametrize("engine", ["single", "fsdp2"])
def test_kill_9_during_a_checkpoint_write_resumes_bit_identically(work, engine):
    """SIGKILL in the middle of writing checkpoint 4 (rank 0, after the engine's files, before
    the manifest): --resume skips the interrupted folder, continues from checkpoint 2, and ends
    with the weights of the uninterrupted run, bit for bit."""
    killer = work / "kill_in_save.py"
    killer.write_text(KILLER.format(script=SCRIPT))
    prefix = [sys.executable] if engine == "single" else torchrun()[:-1]
    extra = ["--save-interval", "2"] + (["--fsdp"] if engine == "fsdp2" else [])
    out = f"killed-{engine}"
    r = launch([*prefix, str(killer)], work, out, *extra, ok=False)
    assert r.returncode != 0
    folder = work / out
    assert (folder / ".checkpoint-00000004.tmp").is_dir() and not (folder / "final").exists()
    launch([*prefix, SCRIPT], work, out, *extra, "--resume")
    assert not (folder / ".checkpoint-00000004.tmp").exists()
    # the uninterrupted run: the single-process reference, or the FSDP2 run of the test above
    # (the same flags; run here when this test runs alone)
    reference = "single" if engine == "single" else "fsdp"
    if not (work / reference / "final").is_dir():
        launch(torchrun(), work, reference, *extra)
    a, b = weights(work, out), weights(work, reference)
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert [m["step"] for m in metrics(work, out)] == [1, 2, 3, 4]
