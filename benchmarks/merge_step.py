"""Cost of one merge step (decision + apply) for every registered algorithm, against reference lines.

One step = what ``ForwardState.merge`` does at one block: the algorithm's plan from a metric (B, N, 64) and the
plan applied to the hidden states (B, N, 768) and to the per-forward state (sizes, source map). Token 0 is a
class token. Two reference lines are written in this file from the papers, not taken from any released code:

* ``ref ToMe``: bipartite soft matching as described by Bolya et al. (ICLR 2023, §3): tokens alternate into
  sets A and B (the class token is in A and never merges), each A token draws an edge to its most similar B
  token, the r most similar edges merge, features are size-weighted averages, output = kept A ‖ B.
* ``ref PiToMe``: one step as /work/shared/reference/pitome_spec.md §1.1 / §1.9 states it (vision variant:
  ELU energy with margin 0.9, alternate split of the 2r highest-energy tokens, every A token merges into its
  best B token, output = class ‖ protected ‖ B).

Both references track sources as an index map (B, N0), the cheap way (ToMe's own code keeps a dense
(B, N, N0) matrix), so "tracked" rows compare like with like.

Modes: ``plain`` = first merging layer (no sizes yet, no source map); ``tracked`` = sizes from earlier merges
and a source map (trace_source). Timings: CPU, median and IQR of interleaved repetitions (every variant of
every cell runs once per repetition, so a busy machine slows all of them alike); ratios compare medians of
one run. Launches: leaf ATen operators per step counted with torch.profiler (view / metadata ops left out),
the proxy for kernel launches on a GPU.

End to end (``--e2e``): timm ViT-B/16 (random weights), batch 8, r = 13: unpatched, a reference-style ToMe
patch of timm's Block written here from the paper (fused attention with the log-size bias, keys averaged
over heads as the metric, the reference merge above), and pitome ``tome``.

Usage: python benchmarks/merge_step.py [--threads 1] [--reps 15] [--algorithms tome,pitome] [--e2e] [--json F]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import pitome
from pitome.algorithms import available_algorithms

METRIC_DIM = 64
FEATURES = 768
SIZES = ((197, 8, 19), (577, 8, 57), (1025, 4, 102), (2305, 2, 230))  # tokens, batch, r
PITOME_MARGIN = 0.9  # pitome's default margin at layer 0 (the decay does not act on the first layer)


# --- reference lines (written from the papers) ---------------------------------------------------------------

def reference_tome(x: Tensor, metric: Tensor, r: int, size: Optional[Tensor], source: Optional[Tensor]
                   ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Bipartite soft matching, class token at index 0 protected. Returns (x, size, source)."""
    batch, tokens, _ = x.shape
    k = metric / metric.norm(dim=-1, keepdim=True)
    scores = k[:, 0::2] @ k[:, 1::2].transpose(1, 2)
    scores[:, 0] = float("-inf")  # the class token (first A token) draws no edge
    best, best_b = scores.max(dim=-1)
    edges = best.argsort(dim=-1, descending=True)
    merged_a = edges[:, :r]
    kept_a = edges[:, r:].sort(dim=-1).values  # kept A tokens in their original order (class token first)
    into_b = best_b.gather(1, merged_a)

    def combine(t: Tensor) -> Tensor:
        t_a, t_b = t[:, 0::2], t[:, 1::2]
        c = t.shape[-1]
        kept = t_a.gather(1, kept_a.unsqueeze(-1).expand(-1, -1, c))
        moved = t_a.gather(1, merged_a.unsqueeze(-1).expand(-1, -1, c))
        t_b = t_b.scatter_reduce(1, into_b.unsqueeze(-1).expand(-1, -1, c), moved, reduce="sum")
        return torch.cat([kept, t_b], dim=1)

    s = torch.ones(batch, tokens, 1, dtype=x.dtype, device=x.device) if size is None else size.to(x.dtype).unsqueeze(-1)
    new_size = combine(s)
    out = combine(x * s) / new_size
    if source is not None:  # current slot of each token, then pushed through the source map
        n_kept = kept_a.shape[1]
        n_a = (tokens + 1) // 2
        slot_a = torch.empty(batch, n_a, dtype=torch.long, device=x.device)
        slot_a.scatter_(1, kept_a, torch.arange(n_kept, device=x.device).expand(batch, -1))
        slot_a.scatter_(1, merged_a, n_kept + into_b)
        slot_b = (n_kept + torch.arange(tokens // 2, device=x.device)).expand(batch, -1)
        slot = torch.stack([slot_a[:, : tokens // 2], slot_b], dim=2).flatten(1)
        if tokens % 2:
            slot = torch.cat([slot, slot_a[:, -1:]], dim=1)
        source = slot.gather(1, source)
    return out, new_size.squeeze(-1), source


def reference_pitome(x: Tensor, metric: Tensor, r: int, size: Optional[Tensor], source: Optional[Tensor],
                     margin: float = PITOME_MARGIN) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """One PiToMe step (spec §1.1 / §1.9, vision variant, class token at index 0). Returns (x, size, source)."""
    batch, tokens, _ = x.shape
    k = F.normalize(metric[:, 1:].float(), dim=-1)
    sim = k @ k.transpose(1, 2)
    energy = F.elu(sim - margin).mean(dim=-1)
    order = energy.argsort(dim=-1, descending=True)
    chosen, protected = order[:, : 2 * r], order[:, 2 * r :]
    a_idx, b_idx = chosen[:, 0::2], chosen[:, 1::2]
    sim_ab = sim.gather(1, a_idx.unsqueeze(-1).expand(-1, -1, sim.shape[2])).gather(
        2, b_idx.unsqueeze(1).expand(-1, r, -1))
    dst = sim_ab.argmax(dim=-1)

    def combine(t: Tensor) -> Tensor:
        head, rest = t[:, :1], t[:, 1:]
        c = t.shape[-1]
        pick = lambda idx: rest.gather(1, idx.unsqueeze(-1).expand(-1, -1, c))  # noqa: E731
        out_b = pick(b_idx).scatter_reduce(1, dst.unsqueeze(-1).expand(-1, -1, c), pick(a_idx), reduce="sum")
        return torch.cat([head, pick(protected), out_b], dim=1)

    s = torch.ones(batch, tokens, 1, dtype=x.dtype, device=x.device) if size is None else size.to(x.dtype).unsqueeze(-1)
    new_size = combine(s)
    out = combine(x * s) / new_size
    if source is not None:
        n_keep = 1 + protected.shape[1]
        slot = torch.empty(batch, tokens - 1, dtype=torch.long, device=x.device)
        slot.scatter_(1, protected, torch.arange(1, n_keep, device=x.device).expand(batch, -1))
        slot.scatter_(1, b_idx, torch.arange(n_keep, n_keep + r, device=x.device).expand(batch, -1))
        slot.scatter_(1, a_idx, n_keep + dst)
        slot = torch.cat([torch.zeros(batch, 1, dtype=torch.long, device=x.device), slot], dim=1)
        source = slot.gather(1, source)
    return out, new_size.squeeze(-1), source


# --- the library's step --------------------------------------------------------------------------------------

@dataclass
class Cell:
    tokens: int
    batch: int
    r: int
    mode: str  # 'plain' | 'tracked'
    dtype: torch.dtype

    @property
    def label(self) -> str:
        return f"{self.tokens}x{self.batch} r{self.r} {self.mode} {str(self.dtype).replace('torch.', '')}"


@dataclass
class Inputs:
    x: Tensor
    metric: Tensor
    size: Optional[Tensor]
    source: Optional[Tensor]
    attention: Tensor


def make_inputs(cell: Cell, seed: int = 0) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    b, n = cell.batch, cell.tokens
    # clustered metric (a few centres plus noise), so energies and matches are not all alike
    centres = torch.randn(b, 16, METRIC_DIM, generator=gen)
    pick = torch.randint(0, 16, (b, n), generator=gen)
    metric = centres.gather(1, pick.unsqueeze(-1).expand(-1, -1, METRIC_DIM)) + 0.5 * torch.randn(b, n, METRIC_DIM, generator=gen)
    x = torch.randn(b, n, FEATURES, generator=gen)
    size = source = None
    if cell.mode == "tracked":
        size = torch.randint(1, 4, (b, n), generator=gen).to(torch.float32)
        n0 = 2 * n
        source = torch.randint(0, n, (b, n0), generator=gen)
    attention = torch.rand(b, n, generator=gen).softmax(dim=-1)
    return Inputs(x.to(cell.dtype), metric.to(cell.dtype), size, source, attention)


def load_package(src: str, alias: str) -> ModuleType:
    """Import another checkout's ``pitome`` package (e.g. the code before a change) under another name, so
    both versions run interleaved in one process (the core modules import each other relatively)."""
    root = Path(src) / "pitome"
    spec = importlib.util.spec_from_file_location(alias, root / "__init__.py", submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)
    return module


def library_step(package: ModuleType, name: str, cell: Cell, inputs: Inputs) -> Callable[[], Tensor]:
    """One decision + apply through ForwardState, as a patched block runs it."""
    config_module = importlib.import_module(f"{package.__name__}.config")
    step_module = importlib.import_module(f"{package.__name__}.step")
    config = config_module.MergeConfig(algorithm=name, r=cell.r, trace_source=cell.mode == "tracked")
    settings = config_module.resolve(config, 1, 1)
    state = step_module.ForwardState(settings=settings)

    def step() -> Tensor:
        state.size, state.source, state.merged = inputs.size, inputs.source, False
        state.source_history.clear()
        state.metric = inputs.metric
        state.attention = inputs.attention if settings.needs_attention else None
        return state.merge(0, inputs.x)

    return step


def reference_step(fn: Callable[..., tuple], cell: Cell, inputs: Inputs) -> Callable[[], Tensor]:
    def step() -> Tensor:
        return fn(inputs.x, inputs.metric, cell.r, inputs.size, inputs.source)[0]

    return step


REFERENCES = {"ref ToMe": reference_tome, "ref PiToMe": reference_pitome}

# operators that only make views, allocate or wrap other operators: no kernel of their own on a GPU
_NO_KERNEL = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::view", "aten::as_strided",
              "aten::expand", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::transpose",
              "aten::t", "aten::permute", "aten::reshape", "aten::_reshape_alias", "aten::alias", "aten::detach",
              "aten::resolve_conj", "aten::resolve_neg", "aten::_unsafe_view", "aten::unbind", "aten::split",
              "aten::chunk", "aten::narrow", "aten::lift_fresh", "aten::result_type", "aten::flatten",
              "aten::expand_as", "aten::view_as", "aten::contiguous", "aten::set_", "aten::resize_",
              "aten::to", "aten::_to_copy", "aten::detach_", "aten::numel", "aten::size", "aten::stride",
              "aten::is_nonzero", "aten::dim", "aten::_has_compatible_shallow_copy_type", "aten::unflatten"}


def count_launches(step: Callable[[], Tensor]) -> int:
    """Top-level ATen operator calls of one step that run a kernel (somewhere in their call tree an operator
    that is not a view, an allocation or a wrapper): what a GPU would launch, one per call."""
    from torch.profiler import ProfilerActivity, profile

    def works(event) -> bool:
        return event.name not in _NO_KERNEL or any(works(child) for child in event.cpu_children)

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    top = [e for e in prof.events() if e.name.startswith("aten::") and
           (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    return sum(1 for e in top if works(e))


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def run_steps(algorithms: list[str], cells: list[Cell], reps: int, launches: bool,
              before: Optional[ModuleType] = None, before_algorithms: tuple[str, ...] = ()) -> dict:
    variants: dict[str, dict[str, Callable[[], Tensor]]] = {}
    for cell in cells:
        inputs = make_inputs(cell)
        row = {name: reference_step(fn, cell, inputs) for name, fn in REFERENCES.items()}
        row.update({name: library_step(pitome, name, cell, inputs) for name in algorithms})
        if before is not None:
            row.update({f"{name} (before)": library_step(before, name, cell, inputs) for name in before_algorithms})
        variants[cell.label] = row
    times: dict[str, dict[str, list[float]]] = {label: {name: [] for name in row} for label, row in variants.items()}
    with torch.inference_mode():
        for row in variants.values():  # warm-up
            for step in row.values():
                step()
        for _ in range(reps):
            for label, row in variants.items():
                for name, step in row.items():
                    start = time.perf_counter()
                    step()
                    times[label][name].append(time.perf_counter() - start)
        counts = {}
        if launches:
            for cell in cells:
                if cell.dtype == torch.float32:
                    counts[cell.label] = {name: count_launches(step) for name, step in variants[cell.label].items()}
    return {"times": times, "launches": counts}


def print_steps(result: dict, cells: list[Cell]) -> None:
    times, launches = result["times"], result["launches"]
    for cell in cells:
        row = times[cell.label]
        ref_tome = statistics.median(row["ref ToMe"])
        ref_pitome = statistics.median(row["ref PiToMe"])
        counts = launches.get(cell.label, {})
        print(f"\n### {cell.label}\n")
        print("| variant | median ms | IQR ms | / ref ToMe | / ref PiToMe | launches |")
        print("|---|---|---|---|---|---|")
        for name, values in row.items():
            q1, med, q3 = quartiles(values)
            print(f"| {name} | {1e3 * med:.2f} | {1e3 * q1:.2f}-{1e3 * q3:.2f} | {med / ref_tome:.2f} | "
                  f"{med / ref_pitome:.2f} | {counts.get(name, '')} |")


def print_summary(result: dict) -> None:
    """One line per cell: every variant's median (launches for fp32 cells) and the ratios the targets are about."""
    times, launches = result["times"], result["launches"]
    names = list(next(iter(times.values())))
    ratios = [("tome", "ref ToMe"), ("pitome", "ref PiToMe"), ("pitome_bsm", "pitome")]
    ratios = [(a, b) for a, b in ratios if a in names and b in names]
    print("\n### Summary: median ms (launches)\n")
    print("| cell | " + " | ".join(names) + "".join(f" | {a} / {b}" for a, b in ratios) + " |")
    print("|---|" + "---|" * (len(names) + len(ratios)))
    for label, row in times.items():
        med = {name: statistics.median(values) for name, values in row.items()}
        counts = launches.get(label, {})
        cells = [f"{1e3 * med[n]:.2f}" + (f" ({counts[n]})" if n in counts else "") for n in names]
        print(f"| {label} | " + " | ".join(cells) + "".join(f" | {med[a] / med[b]:.2f}" for a, b in ratios) + " |")


def check_references(cells: list[Cell]) -> None:
    """How many output tokens of each library step equal its reference line's (fp32 cells), so the two lines
    are seen to do the same work."""
    with torch.inference_mode():
        for cell in cells:
            if cell.dtype != torch.float32:
                continue
            inputs = make_inputs(cell)
            for name, fn in (("tome", reference_tome), ("pitome", reference_pitome)):
                expected = fn(inputs.x, inputs.metric, cell.r, inputs.size, inputs.source)
                got = library_step(pitome, name, cell, inputs)()
                same_shape = got.shape == expected[0].shape
                agree = ((got - expected[0]).abs().amax(-1) < 1e-4).float().mean().item() if same_shape else 0.0
                print(f"check {cell.label}: {name} vs reference: shape {'ok' if same_shape else 'differs'}, "
                      f"{100 * agree:.1f}% of output tokens equal (1e-4; float rounding of near-tied scores can "
                      f"swap a few)")


# --- end to end: timm ViT-B/16 -------------------------------------------------------------------------------

def _reference_block_forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
    """timm Block with ToMe between attention and MLP (proportional attention through the fused kernel)."""
    state = self._ref_state
    attn = self.attn
    batch, tokens, channels = x.shape
    qkv = attn.qkv(self.norm1(x)).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = None if state["size"] is None else state["size"].log().to(x.dtype)[:, None, None, :]
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    y = attn.proj_drop(attn.proj(attn.norm(y.transpose(1, 2).reshape(batch, tokens, channels))))
    x = x + self.drop_path1(self.ls1(y))
    r = min(state["r"], (tokens - 1) // 2)
    if r > 0:
        x, state["size"], _ = reference_tome(x, k.mean(dim=1), r, state["size"], None)
    return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def reference_patch(model: torch.nn.Module, r: int) -> Callable[[], None]:
    """Swap every Block's forward for the reference one; returns the undo."""
    state: dict = {"r": r, "size": None}
    hook = model.register_forward_pre_hook(lambda module, args: state.update(size=None))
    originals = []
    for block in model.blocks:
        originals.append(block.__class__)
        block.__class__ = type("RefToMeBlock", (block.__class__,), {"forward": _reference_block_forward})
        block._ref_state = state

    def undo() -> None:
        hook.remove()
        for block, cls in zip(model.blocks, originals):
            block.__class__ = cls
            del block._ref_state

    return undo


def run_e2e(reps: int, batch: int, r: int) -> dict:
    import timm

    import pitome

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    x = torch.randn(batch, 3, 224, 224)

    def use(name: str) -> Callable[[], None]:
        if name == "reference ToMe (timm Block)":
            return reference_patch(model, r)
        if name == "pitome tome":
            pitome.patch(model, algorithm="tome", r=r)
            return lambda: pitome.unpatch(model)
        return lambda: None

    names = ["unpatched", "reference ToMe (timm Block)", "pitome tome"]
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        outputs = {}
        for name in names:  # warm-up; the two ToMe lines must agree
            undo = use(name)
            outputs[name] = model(x)
            undo()
        diff = (outputs["reference ToMe (timm Block)"] - outputs["pitome tome"]).abs().max().item()
        for _ in range(reps):
            for name in names:
                undo = use(name)
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
                undo()
    return {"times": times, "max_abs_diff_ref_vs_pitome": diff}


def print_e2e(result: dict, batch: int, r: int) -> None:
    times = result["times"]
    base = statistics.median(times["unpatched"])
    ref = statistics.median(times["reference ToMe (timm Block)"])
    print(f"\n### timm ViT-B/16, random weights, batch {batch}, r = {r}\n")
    print("| variant | median s | IQR s | speed-up vs unpatched | time / reference ToMe |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        q1, med, q3 = quartiles(values)
        print(f"| {name} | {med:.3f} | {q1:.3f}-{q3:.3f} | {base / med:.3f} | {med / ref:.3f} |")
    print(f"\nmax |reference - pitome tome| over logits: {result['max_abs_diff_ref_vs_pitome']:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--algorithms", default="all", help="comma-separated names, or 'all' (every registered one)")
    parser.add_argument("--sizes", default="all", help="comma-separated token counts out of 197,577,1025,2305")
    parser.add_argument("--modes", default="plain,tracked")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--no-launches", action="store_true", help="skip the profiler launch counts")
    parser.add_argument("--no-steps", action="store_true", help="only the end-to-end comparison")
    parser.add_argument("--e2e", action="store_true", help="add the timm ViT-B/16 end-to-end comparison")
    parser.add_argument("--e2e-reps", type=int, default=7)
    parser.add_argument("--json", help="also write the raw timings here")
    parser.add_argument("--before", help="src folder of an earlier checkout: its --before-algorithms run "
                                         "interleaved as '<name> (before)' rows")
    parser.add_argument("--before-algorithms", default="tome,pitome,pitome_bsm",
                        help="comma-separated names run from --before (default: tome,pitome,pitome_bsm)")
    parser.add_argument("--check", action="store_true", help="print how far tome / pitome are from the references")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    algorithms = available_algorithms() if args.algorithms == "all" else args.algorithms.split(",")
    sizes = [s for s in SIZES if args.sizes == "all" or str(s[0]) in args.sizes.split(",")]
    cells = [Cell(n, b, r, mode, getattr(torch, dtype)) for n, b, r in sizes for dtype in args.dtypes.split(",")
             for mode in args.modes.split(",")]
    print(f"CPU, {torch.get_num_threads()} thread(s), torch {torch.__version__}; median (IQR) of {args.reps} "
          f"interleaved repetitions; metric width {METRIC_DIM}, features {FEATURES}")
    out: dict = {}
    if args.check:
        check_references(cells)
    before = load_package(args.before, "pitome_before") if args.before else None
    if not args.no_steps:
        out["steps"] = run_steps(algorithms, cells, args.reps, not args.no_launches, before,
                                 tuple(args.before_algorithms.split(",")))
        print_steps(out["steps"], cells)
        print_summary(out["steps"])
    if args.e2e:
        out["e2e"] = run_e2e(args.e2e_reps, batch=8, r=13)
        print_e2e(out["e2e"], batch=8, r=13)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
