"""Benchmark: the image U-Net's training and sampling speed and peak memory, next to diffusers' UNet2DModel.

Both networks have the same architecture (ADM-style ResBlocks with scale-shift norm, attention at one
resolution, the DDPM skips) and parameter count: diffusers' count is 2C lower because its middle attention
has no GroupNorm when ``resnet_time_scale_shift="scale_shift"``. Two sizes: 8x8 digits (1 channel) and a
small 32x32 CIFAR-size net (3 channels).

- Training: one AdamW step of the eps-MSE loss on a DDPM process (linear betas, T = 1000), same batch;
  ours through ``Preconditioned`` and ``denoising_loss``, diffusers' through ``DDPMScheduler.add_noise``.
- Sampling: a 50-NFE deterministic DDIM loop (ours ``sample_ddim``, theirs ``DDIMScheduler``), timed with
  the network and with a network returning zeros: the difference is network time, the rest sampler overhead.

Each case runs in a fresh (spawned) process, so its peak resident memory (ru_maxrss) is its own; it
includes the imports (printed in brackets: torchdiffusion's or diffusers', with torch's). Times are the
best of the timed repetitions (the JSON also has medians): on a shared machine the best is the estimate
least disturbed by other processes. Both libraries run under torchdiffusion's OpenMP wait policy
(``torchdiffusion._openmp``: a short spin, GOMP_SPINCOUNT=3000, unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is set):
with OpenMP's default spin-waiting, two threads on a busy 2-core machine stall ~8 ms at every parallel op (a
128-element ``exp`` took 8 ms instead of 8 us), which measures the machine's load, not the code.

``--levers``: a row per lever of ours (``LEVERS``: layout, bf16 autocast, fused AdamW, torch.compile with its
compile time, and the library's defaults), each against diffusers' float32 default in the same run. With
threads that slept at once (OMP_WAIT_POLICY=PASSIVE), bf16 training at two threads stalled in the AMX backward
convolutions on the VM it was measured on in issue #15 (README, "U-Net speed").

Run: ``python benchmarks/bench_unet.py [--quick] [--levers] [--threads N] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import resource
import statistics
import time

import torchdiffusion  # noqa: F401 - first: the package sets its OpenMP wait policy before torch loads

# isort: split
import torch
from _machine import bf16_capability, cpu_name

from torchdiffusion._openmp import openmp_defaults

T, NFE = 1000, 50
HEAD = 32  # channels per attention head, both libraries
CONFIGS = {
    "digits": dict(
        in_channels=1, image_size=8, channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,)
    ),
    "cifar": dict(
        in_channels=3, image_size=32, channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(16,)
    ),
}
BATCH = {"digits": 128, "cifar": 16}


def ours(name, layout=None):
    """Our U-Net; ``layout`` "cl" (channels-last) or "nchw" (contiguous) overrides the library's choice."""
    from torchdiffusion.nets.unet import UNet

    torch.manual_seed(0)
    net = UNet(**CONFIGS[name], head_channels=HEAD, dropout=0.1, scale_shift=True)
    if layout is not None:
        net.to(memory_format=torch.channels_last if layout == "cl" else torch.contiguous_format)
    return net


# Levers of our U-Net, each a row of ``--levers`` (measured alone, against diffusers' fp32 default):
# layout "nchw" / "cl" (channels-last; None: the library's choice), precision "fp32" / "bf16" (torch.autocast,
# as ``torchdiffusion train --precision bf16``), fused (AdamW's fused kernel; training only), compile
# (torch.compile of the network), and "default": what ``torchdiffusion train`` (training rows) or ``sample`` /
# ``Pipeline.sample`` (sampling rows: precision "auto", bf16 on a CPU with AMX) does with no options.
LEVERS = {
    "fp32, NCHW": dict(layout="nchw", precision="fp32"),
    "fp32, channels-last": dict(layout="cl", precision="fp32"),
    "bf16 autocast, NCHW": dict(layout="nchw", precision="bf16"),
    "bf16 autocast, channels-last": dict(layout="cl", precision="bf16"),
    "fused AdamW (fp32, NCHW)": dict(layout="nchw", precision="fp32", fused=True),
    "torch.compile (fp32)": dict(layout=None, precision="fp32", compile=True),
    "library default": dict(default=True),
}


def _lever(lever, training):
    """(layout, precision, compile, fused) of a lever; "default" resolves as the library does on this machine."""
    lever = LEVERS[lever] if isinstance(lever, str) else (lever or {"default": True})
    if lever.get("default"):
        from torchdiffusion.training.distributed import resolve_precision, unet_layout

        precision = resolve_precision("auto", torch.device("cpu"), "unet")  # training's and Pipeline.sample's
        if not training:  # sampling: the net's own layout
            return None, precision, False, False
        fmt = unet_layout(precision, torch.device("cpu"))
        return (None if fmt is None else "nchw"), precision, False, True  # fused AdamW: training.loop's
    return lever.get("layout"), lever.get("precision", "fp32"), lever.get("compile", False), lever.get("fused", False)


def _wrap(net, precision, compile_):
    """The network under autocast (the library's own ``Autocast``, as training uses it) and / or torch.compile;
    returns (module, compile status): "eager", "compiled", or "fallback: <why>" when compilation is unavailable."""
    from torchdiffusion.training.step import Autocast

    if precision != "fp32":
        net = Autocast(net, "cpu", {"bf16": torch.bfloat16}[precision])
    if not compile_:
        return net, "eager"
    try:
        return torch.compile(net), "compiled"
    except Exception as e:  # noqa: BLE001 - any failure to compile falls back to eager, and says why
        return net, f"fallback: {type(e).__name__}: {e}"[:120]


def theirs(name):
    from diffusers import UNet2DModel

    cfg = CONFIGS[name]
    sizes = [cfg["image_size"] >> i for i in range(len(cfg["channel_mult"]))]
    attn = [s in cfg["attention_resolutions"] for s in sizes]
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=cfg["image_size"],
        in_channels=cfg["in_channels"],
        out_channels=cfg["in_channels"],
        block_out_channels=tuple(cfg["channels"] * m for m in cfg["channel_mult"]),
        layers_per_block=cfg["num_res_blocks"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=HEAD,
        dropout=0.1,
        resnet_time_scale_shift="scale_shift",
    )


def _data(name, n=512):
    cfg = CONFIGS[name]
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, cfg["in_channels"], cfg["image_size"], cfg["image_size"], generator=g).clamp(-1, 1)


def _times(fn, warmup, reps, first=None):
    """Timed repetitions of fn after ``warmup`` calls; ``first``: a list that receives the first call's time."""
    for k in range(warmup):
        t0 = time.perf_counter()
        fn()
        if k == 0 and first is not None:
            first.append(time.perf_counter() - t0)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _compiled(r, status, first, times):
    """The compile status, and its time: the first (compiling) call less a steady one."""
    r["compile"] = status
    if status == "compiled":
        r["compile_s"] = first[0] - min(times)
    return r


def train_ours(name, warmup, reps, lever=None):
    from torchdiffusion import Discrete, Preconditioned, beta_linear
    from torchdiffusion.objectives.denoising import denoising_loss

    layout, precision, compile_, fused = _lever(lever, training=True)
    process = Discrete.from_schedule(beta_linear, T)
    net = ours(name, layout)
    inner, status = _wrap(net, precision, compile_)
    model = Preconditioned(inner, process)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=fused or None)
    data, gen, B = _data(name), torch.Generator().manual_seed(0), BATCH[name]

    def step():
        x0 = data[torch.randint(0, len(data), (B,), generator=gen)]
        loss = denoising_loss(model, process, x0, generator=gen).mean()  # eps-MSE (Ho et al. 2020, Eq. 14)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    first = []
    times = _times(step, warmup, reps, first)
    r = {"times": times, "per": B, "params": net.num_parameters(), "precision": precision, "layout": layout}
    return _compiled(r, status, first, times)


def train_diffusers(name, warmup, reps):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear")
    net = theirs(name)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    data, gen, B = _data(name), torch.Generator().manual_seed(0), BATCH[name]

    def step():
        x0 = data[torch.randint(0, len(data), (B,), generator=gen)]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, T, (B,), generator=gen)
        loss = torch.nn.functional.mse_loss(net(sched.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return {"times": _times(step, warmup, reps), "per": B, "params": sum(p.numel() for p in net.parameters())}


class _Zero(torch.nn.Module):
    """The trivial network: eps_hat = 0, in the U-Net's signature."""

    def forward(self, x, c_noise, class_labels=None):
        return torch.zeros_like(x)


def sample_ours(name, warmup, reps, trivial=False, lever=None):
    from torchdiffusion import Discrete, Preconditioned, as_denoiser, beta_linear, count_nfe, grid_discrete
    from torchdiffusion.samplers import sample_ddim

    layout, precision, compile_, _ = _lever(lever, training=False)
    process = Discrete.from_schedule(beta_linear, T)
    net, status = (_Zero(), "eager") if trivial else _wrap(ours(name, layout).eval(), precision, compile_)
    den = count_nfe(as_denoiser(Preconditioned(net, process), process))
    ts = grid_discrete(process, NFE)  # NFE - 1 steps and the final denoising step: NFE evaluations
    x = process.prior_sample((BATCH[name], *_data(name, 1).shape[1:]), generator=torch.Generator().manual_seed(0))
    first = []
    with torch.no_grad():  # as Pipeline and ``torchdiffusion sample`` run
        out = _times(lambda: sample_ddim(den, process, x, ts), warmup, reps, first)
    assert den.nfe == NFE * (warmup + reps), den.nfe
    return _compiled({"times": out, "per": NFE, "precision": precision, "layout": layout}, status, first, out)


def sample_diffusers(name, warmup, reps, trivial=False):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=False)
    net = None if trivial else theirs(name).eval()
    x0 = torch.randn(BATCH[name], *_data(name, 1).shape[1:], generator=torch.Generator().manual_seed(0))

    def run():
        sched.set_timesteps(NFE)
        x = x0
        for t in sched.timesteps:
            eps = torch.zeros_like(x) if trivial else net(x, t).sample
            x = sched.step(eps, t, x).prev_sample
        return x

    with torch.no_grad():
        return {"times": _times(run, warmup, reps), "per": NFE}


CASES = {
    "train_ours": train_ours,
    "train_diffusers": train_diffusers,
    "sample_ours": sample_ours,
    "sample_diffusers": sample_diffusers,
}


def _peak_mib() -> tuple[float, float | None]:
    """ru_maxrss, and the high-water mark of this process's own memory (VmHWM, Linux).

    Linux carries ru_maxrss over an exec from the process that forked it, so the parent keeps itself
    small (it imports neither library) for the children's ru_maxrss to be their own; VmHWM checks that.
    """
    hwm = None
    try:
        with open("/proc/self/status") as fh:
            hwm = next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, hwm


def _child(case, args, threads, q):
    torch.set_num_threads(threads)
    if "diffusers" in case:  # the imports count in the peak; measured separately as import_mib
        import diffusers  # noqa: F401
    else:
        import torchdiffusion  # noqa: F401
    import_mib = _peak_mib()[0]
    out = CASES[case](*args)
    peak, hwm = _peak_mib()
    q.put(out | {"peak_mib": peak, "hwm_mib": hwm, "import_mib": import_mib})


def run_case(case, *args, threads=2):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(case, args, threads, q))
    p.start()
    out = q.get()
    p.join()
    return out


def machine(threads) -> str:
    cpu = cpu_name()
    omp = " ".join(f"{k} {os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ)
    return (
        f"{cpu}, {mp.cpu_count()} cores, {bf16_capability()}, torch {torch.__version__}, {threads} threads, "
        f"{omp or 'OpenMP default wait policy'}"
    )


def _summary(r):
    best, med = min(r["times"]), statistics.median(r["times"])
    out = {"best_s": best, "median_s": med, "rate": r["per"] / best, "rate_median": r["per"] / med}
    keep = ("peak_mib", "hwm_mib", "import_mib", "precision", "layout", "compile", "compile_s")
    return out | {k: r[k] for k in keep if k in r} | ({"params": r["params"]} if "params" in r else {})


def main():
    openmp_defaults()  # the library's wait policy, read by the spawned children's OpenMP at start-up
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--configs", default="digits,cifar", help="comma-separated subset of " + ",".join(CONFIGS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--levers", action="store_true", help="a row per lever of ours (LEVERS), each against diffusers")
    ap.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None,
        help="include the torch.compile rows with --levers (default: yes, but not with --quick: ~1-2 min each)",
    )  # fmt: skip
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    have_diffusers = importlib.util.find_spec("diffusers") is not None  # not imported here: see _peak_mib
    train_reps, sample_reps = (5, 1) if args.quick else (20, 3)
    levers = ["library default"]
    if args.levers:
        with_compile = not args.quick if args.compile is None else args.compile
        levers = [k for k in LEVERS if with_compile or not LEVERS[k].get("compile")]
    rows, params, load = [], {}, [os.getloadavg()[0]]

    def run(case, name, case_args, lever=None):
        r = run_case(case, name, *case_args, *(() if lever is None else (lever,)), threads=args.threads)
        if "params" in r:
            params.setdefault(name, {})[case.rsplit("_", 1)[1]] = r["params"]
        return _summary(r)

    for name in args.configs.split(","):
        B = BATCH[name]
        benches = [
            (f"training step, batch {B}", "img/s", "train", (3, train_reps), lambda lev: (lev,)),
            (f"DDIM {NFE} NFE, batch {B}: network", "NFE/s", "sample", (1, sample_reps), lambda lev: (False, lev)),
        ]
        for what, unit, case, case_args, extra in benches:
            # diffusers first, then every lever of ours: interleaved per benchmark, so load drifts hit both
            theirs_row = run(f"{case}_diffusers", name, case_args) if have_diffusers else None
            for lever in levers if case == "train" else [k for k in levers if not LEVERS[k].get("fused")]:
                row = {"config": name, "what": what, "unit": unit, "lever": lever}
                row["ours"] = run(f"{case}_ours", name, (*case_args, *extra(lever)))
                if theirs_row is not None:
                    row["diffusers"] = theirs_row
                    row["speed_ratio"] = theirs_row["best_s"] / row["ours"]["best_s"]
                rows.append(row)
        zero = {"config": name, "what": f"DDIM {NFE} NFE, batch {B}: zero net", "unit": "NFE/s", "lever": "-"}
        zero["ours"] = run("sample_ours", name, (1, sample_reps * 3, True))
        if have_diffusers:
            zero["diffusers"] = run("sample_diffusers", name, (1, sample_reps * 3, True))
            zero["speed_ratio"] = zero["diffusers"]["best_s"] / zero["ours"]["best_s"]
        rows.append(zero)
        # per-NFE split: network time = (with network - with zero network) / NFE; overhead = zero / NFE
        for lib in ("ours", "diffusers") if have_diffusers else ("ours",):
            zero[lib]["overhead_ms_per_nfe"] = 1e3 * zero[lib]["best_s"] / NFE
            for r in rows:
                if r["config"] == name and r["what"].endswith("network"):
                    r[lib]["net_ms_per_nfe"] = 1e3 * (r[lib]["best_s"] - zero[lib]["best_s"]) / NFE
    load.append(os.getloadavg()[0])

    print(f"machine: {machine(args.threads)}; load average {load[0]:.1f} at start, {load[1]:.1f} at end")
    for name, p in params.items():
        theirs_n = f", diffusers {p['diffusers']:,}" if "diffusers" in p else ""
        print(f"parameters {name}: ours {p['ours']:,}{theirs_n}")
    mem_head = "peak MiB (imports) ours / theirs"
    print(
        f"{'config':<7} {'benchmark':<34} {'ours: lever':<29} {'ours':>9} {'diffusers':>10} {'unit':<6} "
        f"{'ratio':>6} {'compile s':>9} {mem_head:>32}"
    )
    for r in rows:
        o, d = r["ours"], r.get("diffusers")
        th = f"{d['rate']:>10.1f}" if d else f"{'n/a':>10}"
        ratio = f"{r['speed_ratio']:.2f}x" if d else "n/a"
        comp = o.get("compile", "eager")
        comp = f"{o['compile_s']:.0f}" if "compile_s" in o else ("-" if comp == "eager" else comp[:9])
        mem = f"{o['peak_mib']:.0f} ({o['import_mib']:.0f}) / " + (
            f"{d['peak_mib']:.0f} ({d['import_mib']:.0f})" if d else "n/a"
        )
        print(
            f"{r['config']:<7} {r['what']:<34} {r['lever']:<29} {o['rate']:>9.1f} {th} {r['unit']:<6} {ratio:>6} "
            f"{comp:>9} {mem:>32}"
        )
    for r in rows:
        for key, label in (("net_ms_per_nfe", "network"), ("overhead_ms_per_nfe", "sampler overhead")):
            if key in r["ours"]:
                d = r.get("diffusers")
                th = f"{d[key]:>10.2f}" if d else f"{'n/a':>10}"
                ratio = f"{d[key] / r['ours'][key]:.2f}x" if d else "n/a"
                print(
                    f"{r['config']:<7} {label + ' per NFE':<34} {r['lever']:<29} {r['ours'][key]:>9.2f} {th} "
                    f"{'ms':<6} {ratio:>6}"
                )
    print("ratio = diffusers time / our time (higher: ours faster); best of the timed repetitions; diffusers in")
    print("float32 as its users run it. compile s: the first (compiling) call less a steady one.")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine(args.threads), "load": load, "params": params, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
