"""The flags every verb shares: one spelling, one meaning, one default each, validated before anything loads.

    --model SPEC [--weights pretrained|random] [--model-kwargs JSON]     (see pitome.loading)
    --algorithms A [B ...] (commas work too)  --ratios X [Y ...]  --r R [...]  --flops-reduction F [...]
    --preset NAME  --option KEY=VALUE (repeatable)  --budgets FILE.json
    --device auto|cpu|cuda|cuda:N|mps  --threads N  --seed N
    --out DIR (a results folder is created inside it and printed at start)

Parsing checks syntax and ranges (no torch import, so ``--help`` stays fast); ``merge_choices`` then checks
names and options against the algorithm registry (imports torch, loads no model). Every failure is a
``UserError`` naming the bad value and what is allowed.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .errors import UserError, one_line, unknown_name

__all__ = ["Parser", "add_model_flags", "add_merge_flags", "add_runtime_flags", "add_output_flags",
           "MergeChoices", "merge_choices", "options_for", "resolve_device", "apply_threads", "DEFAULT_MODEL", "DEFAULT_OUT",
           "WEIGHTS", "PATCH_KEYS", "ratio", "r_value", "flops_reduction", "positive_int", "non_negative_int",
           "key_value", "json_object", "split_names"]

DEFAULT_MODEL = "dinov2-s"
DEFAULT_OUT = "pitome-results"
WEIGHTS = ("pretrained", "random")
AUTO = "auto"  # in --algorithms: preset="auto" (our measured defaults for the model's family)
PATCH_KEYS = ("layers", "prop_attn", "size_weighted", "metric", "seed")  # pitome.patch arguments for every algorithm
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class Parser(argparse.ArgumentParser):
    """argparse that raises ``UserError`` (one line, exit 2 in ``pitome.cli.main``) instead of printing usage, and
    takes flags only as spelled (no silent abbreviations)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(message)


# --- value types (argparse ``type=``; an ArgumentTypeError becomes "argument --x: message") ---------------

def _number(text: str, cast: Any, what: str) -> Any:
    try:
        return cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}, got {text!r}") from None


def ratio(text: str) -> float:
    value = _number(text, float, "a keep-ratio is a number in (0, 1]")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a keep-ratio is in (0, 1] (share of tokens kept per block), got {text}")
    return value


def r_value(text: str) -> int:
    value = _number(text, int, "r is an integer >= 0 (tokens removed per block)")
    if value < 0:
        raise argparse.ArgumentTypeError(f"r is an integer >= 0 (tokens removed per block), got {text}")
    return value


def flops_reduction(text: str) -> float:
    value = _number(text, float, "a FLOPs reduction is a number in [0, 1) (0.3 = remove 30%)")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"a FLOPs reduction is in [0, 1) (0.3 = remove 30%), got {text}")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int, "expected an integer >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int, "expected an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def parse_value(raw: str) -> Any:
    """JSON (0.8, true, [0,1], "x"), Python spellings True/False/None, else the text itself."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return {"True": True, "False": False, "None": None}.get(raw, raw)


def key_value(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. margin=0.8, prop_attn=false), got {text!r}")
    return key.strip(), parse_value(raw.strip())


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"depth\": 2}}', got {text!r}")
    return value


def json_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"{text} is not valid JSON ({exc})") from None
    return path


def device_name(text: str) -> str:
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use auto, cpu, cuda, cuda:N or mps")
    return text


def model_spec(text: str) -> str:
    from ..loading import parse_model_spec

    try:
        parse_model_spec(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def split_names(values: Optional[Sequence[str]]) -> list[str]:
    """['pitome,tome', 'kth'] -> ['pitome', 'tome', 'kth'] (both spellings of a list work)."""
    return [name.strip() for value in values or () for name in value.split(",") if name.strip()]


# --- flag groups ------------------------------------------------------------------------------------------

def add_model_flags(parser: argparse.ArgumentParser, *, default: Optional[str] = DEFAULT_MODEL,
                    multiple: bool = False, what: str = "") -> None:
    """--model, --weights, --model-kwargs."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", nargs="+" if multiple else None, type=model_spec,
                       default=[default] if multiple and default else default, metavar="SPEC",
                       help=f"{what}timm:NAME, hf:ID_OR_FOLDER, openclip:ARCH[/TAG], a built-in (dinov2-s, minilm, "
                            f"tiny-vit, tiny-bert), or a bare name (tried as timm, then Hugging Face)"
                            + (f" (default {default})" if default else ""))
    group.add_argument("--weights", choices=WEIGHTS, default="pretrained",
                       help="pretrained (default; hub models need a network or a filled cache) or random "
                            "(smoke tests; every output says so)")
    group.add_argument("--model-kwargs", type=json_object, default=None, metavar="JSON",
                       help="extra constructor arguments, e.g. '{\"img_size\": 64}'")


def add_merge_flags(parser: argparse.ArgumentParser, *, ratios_default: Sequence[float] = (0.9,),
                    algorithms_default: str = "pitome, tome") -> None:
    """--algorithms, --ratios, --r, --flops-reduction, --preset, --option, --budgets."""
    group = parser.add_argument_group("merging")
    group.add_argument("--algorithms", nargs="+", default=None, metavar="NAME",
                       help=f"merging algorithms, space- or comma-separated; 'auto' = preset auto "
                            f"(default: {algorithms_default})")
    group.add_argument("--ratios", nargs="+", type=ratio, default=None, metavar="X",
                       help=f"keep-ratios per merging block, in (0, 1] (default {' '.join(map(str, ratios_default))} "
                            f"unless --r or --flops-reduction is given)")
    group.add_argument("--r", nargs="+", type=r_value, default=None, metavar="R",
                       help="tokens removed per merging block (ToMe's budget)")
    group.add_argument("--flops-reduction", nargs="+", type=flops_reduction, default=None, metavar="F",
                       help="solve each algorithm's budget to remove this share of FLOPs, in [0, 1)")
    group.add_argument("--preset", default=None, metavar="NAME",
                       help="official per-family settings (deit, mae, clip, bert, paper, ...) or auto")
    group.add_argument("--option", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                       help="pitome.patch option, repeatable; given to the algorithms that accept it "
                            "(e.g. margin=0.8, prop_attn=false, layers=[0,1,2])")
    group.add_argument("--budgets", type=json_file, default=None, metavar="FILE",
                       help="calibrated per-block budgets (JSON from pitome calibrate)")


def add_runtime_flags(parser: argparse.ArgumentParser, *, seed: bool = True) -> None:
    """--device, --threads, --seed."""
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", type=device_name, default="auto",
                       help="auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps (default auto)")
    group.add_argument("--threads", type=positive_int, default=None, metavar="N", help="torch CPU threads")
    if seed:
        group.add_argument("--seed", type=non_negative_int, default=0, help="seed for inputs and randomised "
                                                                            "algorithms (default 0)")


def add_output_flags(parser: argparse.ArgumentParser, *, default: str = DEFAULT_OUT) -> None:
    """--out DIR, --no-progress."""
    group = parser.add_argument_group("output")
    group.add_argument("--out", default=default, metavar="DIR",
                       help=f"parent folder; each run writes into a new dated folder inside it, printed at start "
                            f"(default ./{default})")
    group.add_argument("--no-progress", action="store_true", help="no progress display")


# --- validated merge choices ------------------------------------------------------------------------------

@dataclass(frozen=True)
class MergeChoices:
    """What the merge flags asked for, checked against the registry (no model needed)."""

    algorithms: list[str]
    ratios: list[float] = field(default_factory=list)
    rs: list[int] = field(default_factory=list)
    flops_reductions: list[float] = field(default_factory=list)
    preset: Optional[str] = None
    options: dict = field(default_factory=dict)
    budgets: Optional[Path] = None

    def options_for(self, algorithm: str) -> dict:
        """The options this algorithm accepts (patch-level keys go to every algorithm)."""
        return options_for(algorithm, self.options)

    def settings(self, unmerged: bool = True) -> list:
        """One ``MergeSetting`` per algorithm x budget (the unmerged model first); solved budgets stay solved."""
        from ..setting import MergeSetting

        out = [MergeSetting()] if unmerged else []
        for name in self.algorithms:
            algorithm, preset, label = (None, AUTO, AUTO) if name == AUTO else (name, self.preset, None)
            common = dict(preset=preset, name=label, budgets=None if self.budgets is None else str(self.budgets),
                          **self.options_for(name))
            out += [MergeSetting.make(algorithm, ratio=value, **common) for value in self.ratios]
            out += [MergeSetting.make(algorithm, r=value, **common) for value in self.rs]
            out += [MergeSetting.make(algorithm, flops_reduction=value, **common) for value in self.flops_reductions]
        return out


def options_for(algorithm: str, options: dict) -> dict:
    """The subset of ``options`` that ``algorithm`` accepts: its own options and the patch-level keys
    ('auto' takes all: its preset decides the algorithm)."""
    from ..algorithms import algorithm_class

    if algorithm == AUTO:
        return dict(options)
    accepted = set(PATCH_KEYS) | set(algorithm_class(algorithm).option_names())
    return {k: v for k, v in options.items() if k in accepted}


def merge_choices(args: argparse.Namespace, *, text: bool = False, default_algorithms: Sequence[str] = (),
                  default_ratios: Sequence[float] = (0.9,)) -> MergeChoices:
    """Validate the merge flags of ``args`` (names, preset, options: a dry run of ``pitome.patch``'s checks)."""
    from ..algorithms import available_algorithms
    from ..config import available_presets

    names = split_names(getattr(args, "algorithms", None)) or list(default_algorithms) or \
        (["pitome_text", "tome"] if text else ["pitome", "tome"])
    known = available_algorithms() + [AUTO]
    for name in names:
        if name not in known:
            raise unknown_name("algorithm", name, known)
    names = list(dict.fromkeys(names))
    preset = getattr(args, "preset", None)
    if preset is not None and preset not in available_presets():
        raise unknown_name("preset", preset, available_presets())
    ratios = list(getattr(args, "ratios", None) or [])
    rs = list(getattr(args, "r", None) or [])
    reductions = list(getattr(args, "flops_reduction", None) or [])
    if not (ratios or rs or reductions):
        ratios = list(default_ratios)
    options = dict(getattr(args, "option", None) or [])
    choices = MergeChoices(names, ratios, rs, reductions, preset, options, getattr(args, "budgets", None))
    _check_options(choices, text)
    return choices


def _check_options(choices: MergeChoices, text: bool) -> None:
    """Every option is accepted by some chosen algorithm, and each algorithm accepts its options' values."""
    from ..algorithms import algorithm_class
    from ..config import build_config, resolve

    accepted = set(PATCH_KEYS)
    for name in choices.algorithms:
        if name != AUTO:
            accepted |= set(algorithm_class(name).option_names())
    unknown = sorted(set(choices.options) - accepted)
    if unknown and AUTO not in choices.algorithms:
        raise UserError(f"option(s) {unknown} are not accepted by {', '.join(choices.algorithms)}; "
                        f"accepted: {', '.join(sorted(accepted))}")
    family = "text" if text else "vision"
    for name in choices.algorithms:
        preset = AUTO if name == AUTO else choices.preset
        budget = {"ratio": choices.ratios[0]} if choices.ratios else ({"r": choices.rs[0]} if choices.rs else {})
        try:  # a 12-block model with one protected token stands in for the real one: names and values only
            config = build_config(12, None if name == AUTO else name, preset=preset, family=family, **budget,
                                  **choices.options_for(name))
            resolve(config, 12, 1)
        except (ValueError, TypeError) as exc:
            raise UserError(f"{name}: {' '.join(str(exc).split())}") from None


# --- runtime ----------------------------------------------------------------------------------------------

def resolve_device(name: str) -> Any:
    """'auto' -> cuda if available else cpu; others checked to exist here. Returns a torch.device."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"--device {name}: MPS is not available here; use --device cpu or auto")
    return device


def apply_threads(threads: Optional[int]) -> None:
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def read_config_file(path: "str | Path") -> dict:
    """A ``--config`` file (YAML or JSON) as a mapping; every problem is one UserError naming the file and line.
    Shared by the verbs that take ``--config``; each checks the keys against its own flags."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise UserError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or use a .json config") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            line = f", line {mark.line + 1}" if mark is not None else ""
            raise UserError(f"{path}{line}: invalid YAML ({one_line(getattr(error, 'problem', error))})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}, line {error.lineno}: invalid JSON ({error.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config is a mapping of flag names to values")
    return data
