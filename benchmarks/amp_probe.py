"""The CPU mixed precision probe (`channelslast_cb.fp16.measure_amp_speed`) against real training steps.

    flock /tmp/cl_bench.lock .venv/bin/python benchmarks/amp_probe.py                    # report on stdout
    flock /tmp/cl_bench.lock .venv/bin/python benchmarks/amp_probe.py --out benchmarks/results/amp_probe.md

For fp16 and bf16 it reports:

- the probe, run `--probes` times in fresh measurements (ratio over fp32, capped or not, wall time it took): what
  `amp_speed` would decide once per process;
- real training steps (forward, loss, backward, optimizer step; fp16 with a `GradScaler`) of a small CNN (16 images
  of 32 px, three 3x3 convolutions with BatchNorm) and of torchvision's resnet18 (8 images of 64 px), in fp32 and
  under CPU autocast, channels-last, interleaved, one warm-up step each: the median over `--rounds` paired rounds of
  (mode / fp32). Timed as CPU time of one thread (`time.thread_time()` with `torch.set_num_threads(1)`), like the
  probe, because this machine is shared and wall time would measure the other processes' load; wall-clock ratios
  are printed beside them for reference.
"""
import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from channelslast_cb.fp16 import AMP_SLOW_RATIO, AMPMode, cpu_native, measure_amp_speed


def small_cnn():
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def resnet18():
    import torchvision
    return torchvision.models.resnet18(num_classes=10)


def step_ratios(make, bs, px, rounds, modes=('fp16', 'bf16')):
    "Median over paired rounds of (step time in mode / fp32 step time): CPU time of one thread, and wall time"
    x = torch.randn(bs, 3, px, px).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (bs,))
    nets = {}
    for m in ('fp32', *modes):
        torch.manual_seed(0)
        net = make().to(memory_format=torch.channels_last)
        nets[m] = net, torch.optim.SGD(net.parameters(), lr=1e-3, momentum=.9)
    scaler = torch.amp.GradScaler('cpu')

    def step(mode):
        net, opt = nets[mode]
        c, w = time.thread_time(), time.perf_counter()
        dtype = torch.float32 if mode == 'fp32' else AMPMode(mode).dtype
        with torch.autocast('cpu', dtype=dtype, enabled=mode != 'fp32'): out = net(x)
        loss = F.cross_entropy(out.float(), y)
        if mode == 'fp16': scaler.scale(loss).backward(); scaler.step(opt); scaler.update()
        else: loss.backward(); opt.step()
        opt.zero_grad()
        return time.thread_time() - c, time.perf_counter() - w

    for m in nets: step(m)
    cpu, wall, t32s = {m: [] for m in modes}, {m: [] for m in modes}, []
    for _ in range(rounds):
        c32, w32 = step('fp32')
        t32s.append(c32)
        for m in modes:
            c, w = step(m)
            cpu[m].append(c / c32); wall[m].append(w / w32)
    return statistics.median(t32s), {m: (statistics.median(cpu[m]), statistics.median(wall[m])) for m in modes}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--probes', type=int, default=3, help='fresh probe measurements per mode')
    p.add_argument('--rounds', type=int, default=5, help='paired rounds of training steps per model')
    p.add_argument('--out', help='also write the report (Markdown) to this file')
    args = p.parse_args()
    start = time.perf_counter()
    torch.set_num_threads(1)
    cpu_name = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), '?')
    flags = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
    isa = sorted({w for w in flags.split() if w.startswith(('avx512_bf16', 'avx512_fp16', 'amx'))})
    out = [f"# The CPU mixed precision probe against real training steps (issue 9)", "",
           f"Command: `python {' '.join(sys.argv)}`", "",
           f"Machine: {cpu_name}, {os.cpu_count()} CPUs, 16-bit ISA flags: {', '.join(isa) or 'none'}; "
           f"cpu_native: fp16 {cpu_native(torch.float16)}, bf16 {cpu_native(torch.bfloat16)}",
           f"python {platform.python_version()}, torch {torch.__version__}; date "
           f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; load average at start "
           f"{' '.join(f'{v:.1f}' for v in os.getloadavg())} (shared machine)", "",
           f"## The probe (`measure_amp_speed`, threshold AMP_SLOW_RATIO = {AMP_SLOW_RATIO:g}x)", "",
           "| mode | ratio over fp32 (each probe) | slow | capped | probe wall time |", "|---|---|---|---|---|"]
    for m in ('fp16', 'bf16'):
        ss = [measure_amp_speed(m) for _ in range(args.probes)]
        out.append(f"| {m} | {', '.join(f'{s.ratio:.2f}x' for s in ss)} | {', '.join(str(s.slow) for s in ss)} | "
                   f"{', '.join(str(s.capped) for s in ss)} | {', '.join(f'{s.seconds * 1e3:.0f} ms' for s in ss)} |")
        print(out[-1], flush=True)
    out += ["", "## Real training steps (channels-last, SGD; fp16 with a GradScaler)", "",
            "| model | batch | fp32 step (CPU ms) | fp16 / fp32 (CPU time) | bf16 / fp32 (CPU time) | fp16 / fp32 (wall) | "
            "bf16 / fp32 (wall) |", "|---|---|---|---|---|---|---|"]
    for name, make, bs, px in (('small CNN (3 conv + BN)', small_cnn, 16, 32), ('resnet18 (torchvision)', resnet18, 8, 64)):
        t32, r = step_ratios(make, bs, px, args.rounds)
        out.append(f"| {name} | {bs}x3x{px}x{px} | {t32 * 1e3:.1f} | {r['fp16'][0]:.2f}x | {r['bf16'][0]:.2f}x | "
                   f"{r['fp16'][1]:.2f}x | {r['bf16'][1]:.2f}x |")
        print(out[-1], flush=True)
    out += ["", f"Load average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}; total time "
                f"{time.perf_counter() - start:.0f} s.", ""]
    text = '\n'.join(out)
    print(text)
    if args.out:
        with open(args.out, 'w') as f: f.write(text)


if __name__ == '__main__': main()
