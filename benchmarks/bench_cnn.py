"""Optimizer step time on a convolutional network, where many magnitude blocks are short: Gefen
against torch's AdamW (fused and foreach) on ResNet-18's parameters, side by side, interleaved.

    python benchmarks/bench_cnn.py [--steps 11] [--threads T] [--cpu-path avx2] [--channels-last]

ResNet-18 as for 32x32 images (CIFAR: a 3x3 stem, no max-pool; 11.2M parameters), built here
from torch.nn (torchvision is not needed). The gradients are real: one backward of the
cross-entropy of a batch of random images, so Gefen's first step infers the periods a real
run would (a 3x3 kernel's 9 elements for some convolutions). Prints the share of parameters
per period, then each optimizer's median step (the same gradients every step) and its ratio
to fused AdamW's. With --channels-last the model, so its parameters and gradients, are stored
channels_last (as for oneDNN's or cuDNN's fast convolutions), and Gefen also steps a contiguous
copy of them, side by side: the kernels step the 4-d weights through contiguous copies.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
from torch import nn

from gefen_compile import Gefen
from gefen_compile.kernels import native


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False),
                                          nn.BatchNorm2d(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def resnet18(classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64),
                               nn.ReLU()]
    width = 64
    for outputs, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(width, outputs, stride), BasicBlock(outputs, outputs, 1)]
        width = outputs
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=11)
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--cpu-path", choices=native.CPU_PATHS,
                        help="Gefen's C step path (default: the fastest the CPU runs)")
    parser.add_argument("--channels-last", action="store_true",
                        help="parameters and gradients stored channels_last")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_path:
        native.use_cpu_path(args.cpu_path)
    torch.manual_seed(0)
    model = resnet18()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    nn.functional.cross_entropy(model(images), labels).backward()
    grads = [p.grad for p in model.parameters()]
    optimizers = {
        "Gefen": Gefen,
        "AdamW (fused)": lambda params: torch.optim.AdamW(params, fused=True),
        "AdamW (foreach)": lambda params: torch.optim.AdamW(params, foreach=True),
    }
    layouts = {name: torch.preserve_format for name in optimizers}
    if args.channels_last:
        optimizers["Gefen, contiguous"] = Gefen
        layouts["Gefen, contiguous"] = torch.contiguous_format
    runs = {}
    for name, build in optimizers.items():
        params = [nn.Parameter(p.detach().clone(memory_format=layouts[name]))
                  for p in model.parameters()]
        for p, g in zip(params, grads):
            p.grad = g.clone(memory_format=layouts[name])
        runs[name] = (build(params), params)
    gefen, params = runs["Gefen"]
    for optimizer, _ in runs.values():
        optimizer.step()  # Gefen's first step: periods and codebook
    shares = collections.Counter()
    for p in params:
        shares[gefen.state[p]["period"]] += p.numel()
    total = sum(shares.values())
    layout = "channels_last" if args.channels_last else "contiguous"
    print(f"ResNet-18 (32x32 images), {total / 1e6:.1f}M parameters ({layout}), "
          f"{torch.get_num_threads()} threads; {native.describe()}")
    print("parameters per period: " + ", ".join(
        f"{period}: {count / total:.1%}" for period, count in sorted(shares.items())))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.steps):
        for name, (optimizer, _) in runs.items():
            start = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - start)
    fused = statistics.median(times["AdamW (fused)"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name}: {median * 1e3:.2f} ms ({median / fused:.2f}x fused AdamW), "
              f"median of {args.steps} interleaved steps")


if __name__ == "__main__":
    main()
