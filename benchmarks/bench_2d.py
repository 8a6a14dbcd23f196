"""Benchmark: the 2-D model's training and sampling speed and peak memory, next to diffusers.

Each case runs in a fresh process, so its peak resident memory (ru_maxrss) is its own.
Both libraries drive the same network (torchdiffusion's MLP, width 256, depth 4) on the same
DDPM process (linear betas, T = 1000), batch and optimizer; diffusers' part is its
DDPMScheduler (add_noise for training, step for sampling). Where diffusers is not installed
(``pip install -e '.[compare]'``) only our figures are printed.

Run: ``make bench`` (or ``python benchmarks/bench_2d.py --quick``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time

import torch
from _machine import cpu_name

BATCH, WIDTH, DEPTH, T = 512, 256, 4, 1000


def _net():
    from torchdiffusion.nets import MLP

    torch.manual_seed(0)
    return MLP(2, width=WIDTH, depth=DEPTH)


def _data(n):
    from torchdiffusion.data import make_2d

    return make_2d("moons", n, generator=torch.Generator().manual_seed(0))


def train_ours(steps):
    from torchdiffusion import Discrete, Preconditioned, beta_linear
    from torchdiffusion.objectives.denoising import denoising_loss

    process = Discrete.from_schedule(beta_linear, T)
    model = Preconditioned(_net(), process)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data, gen = _data(20000), torch.Generator().manual_seed(0)

    def step():
        batch = data[torch.randint(0, len(data), (BATCH,), generator=gen)]
        loss = denoising_loss(model, process, batch, generator=gen).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _rate(step, steps)


def train_diffusers(steps):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear")
    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    data, gen = _data(20000), torch.Generator().manual_seed(0)

    def step():
        batch = data[torch.randint(0, len(data), (BATCH,), generator=gen)]
        noise = torch.randn(batch.shape, generator=gen)
        t = torch.randint(0, T, (BATCH,), generator=gen)
        xt = sched.add_noise(batch, noise, t)
        loss = torch.nn.functional.mse_loss(net(xt, t.float() / T), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _rate(step, steps)


def sample_ours(n, steps, trivial=False):
    from torchdiffusion import Discrete, Preconditioned, as_denoiser, beta_linear, grid_discrete, sample_ddpm

    process = Discrete.from_schedule(beta_linear, T)
    den = (lambda x, t: torch.zeros_like(x)) if trivial else as_denoiser(Preconditioned(_net(), process), process)
    ts = grid_discrete(process, steps, spacing="leading")
    x = process.prior_sample((n, 2), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return _rate(lambda: sample_ddpm(den, process, x, ts, generator=torch.Generator().manual_seed(1)), 3)


def sample_diffusers(n, steps, trivial=False):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear")
    net = _net()
    x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(0))

    def run():
        sched.set_timesteps(steps)
        gen = torch.Generator().manual_seed(1)
        x = x0
        for t in sched.timesteps:
            eps = torch.zeros_like(x) if trivial else net(x, torch.full((n,), float(t) / T))
            x = sched.step(eps, t, x, generator=gen).prev_sample
        return x

    with torch.no_grad():
        return _rate(run, 3)


def _rate(fn, reps):
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def _child(name, args, q):
    torch.set_num_threads(2)
    sec = CASES[name](*args)
    q.put((sec, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


CASES = {
    "train_ours": train_ours,
    "train_diffusers": train_diffusers,
    "sample_ours": sample_ours,
    "sample_diffusers": sample_diffusers,
}


def run_case(name, *args):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(name, args, q))
    p.start()
    sec, mem = q.get()
    p.join()
    return sec, mem


def machine() -> str:
    cpu = cpu_name()
    return f"{cpu}, {mp.cpu_count()} cores, torch {torch.__version__}, 2 threads"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    try:
        import diffusers  # noqa: F401

        have_diffusers = True
    except ImportError:
        have_diffusers = False
    n_train, n_samp, sample_steps = (20, 2000, 50) if args.quick else (100, 2000, 100)
    rows = []

    def add(what, unit, ours_case, theirs_case, ours_args, per):
        s_ours, m_ours = run_case(ours_case, *ours_args)
        row = {"what": what, "unit": unit, "ours": per / s_ours, "ours_peak_mib": m_ours}
        if have_diffusers:
            s_th, m_th = run_case(theirs_case, *ours_args)
            row |= {"diffusers": per / s_th, "diffusers_peak_mib": m_th, "speed_ratio": s_th / s_ours}
        rows.append(row)

    add(f"training steps (batch {BATCH})", "steps/s", "train_ours", "train_diffusers", (n_train,), 1)
    add(
        f"DDPM sampling, {sample_steps} steps",
        "samples/s",
        "sample_ours",
        "sample_diffusers",
        (n_samp, sample_steps),
        n_samp,
    )
    add(
        f"sampler overhead, {sample_steps} steps, zero denoiser",
        "samples/s",
        "sample_ours",
        "sample_diffusers",
        (n_samp, sample_steps, True),
        n_samp,
    )
    print(f"machine: {machine()}")
    print(f"{'benchmark':<46} {'torchdiffusion':>16} {'diffusers':>16} {'ratio':>7} {'peak MiB (ours/theirs)':>24}")
    for r in rows:
        th = f"{r['diffusers']:>12.1f}" if "diffusers" in r else f"{'n/a':>12}"
        ratio = f"{r['speed_ratio']:.2f}x" if "speed_ratio" in r else "n/a"
        mem = f"{r['ours_peak_mib']:.0f}/" + (f"{r['diffusers_peak_mib']:.0f}" if "diffusers" in r else "n/a")
        print(f"{r['what']:<46} {r['ours']:>12.1f} {r['unit'][:4]:<3} {th} {r['unit'][:4]:<3} {ratio:>7} {mem:>24}")
    print("ratio = torchdiffusion speed / diffusers speed (higher is faster); same network, batch, optimizer.")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine(), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
