"""What every model adapter provides, and the class-swapping helpers they share.

An adapter knows where a model family keeps its blocks, keys and protected tokens, and how it pools.
It swaps a module's class for a subclass that adds the merge step (no weights are copied); ``unpatch``
swaps the original class back. Adapters never contain a merging algorithm.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, ClassVar, Optional

from torch import nn

from ..config import MergeSettings
from ..step import ForwardState, RootKey, current_state

__all__ = ["Adapter", "UnsupportedModelError", "swap_class", "restore_class", "is_swapped", "root_state",
           "remove_hooks", "get_tag", "set_tags", "clear_tags", "TAGS"]

# Tags pitome stores on a patched module (in its __dict__, so nn.Module's attribute machinery never sees them and
# deep copies / pickles carry them): key = the model's RootKey, layer = block index, settings = MergeSettings,
# adapter = the Adapter that patched the model, last = the latest forward's MergeInfo; adapters may add their own.
TAGS = ("key", "layer", "settings", "adapter", "last")
_PREFIX = "_pitome_"


def get_tag(module: nn.Module, name: str, default: Any = None) -> Any:
    """The pitome tag ``name`` of a module (``default`` when unset). The only reader of tags."""
    return module.__dict__.get(_PREFIX + name, default)


def set_tags(module: nn.Module, **tags: Any) -> None:
    """Set pitome tags on a module (``None`` values are skipped). The only writer of tags."""
    for name, value in tags.items():
        if value is not None:
            module.__dict__[_PREFIX + name] = value


def clear_tags(module: nn.Module, *names: str) -> Any:
    """Remove the named tags (all pitome tags when none are named); returns the value of the last one named."""
    value = None
    for attr in [_PREFIX + n for n in names] or [a for a in module.__dict__ if a.startswith(_PREFIX)]:
        value = module.__dict__.pop(attr, None)
    return value


class UnsupportedModelError(TypeError):
    """The model (or one of its parts) is not something an adapter knows how to patch."""


class Adapter:
    name: ClassVar[str] = ""
    supports: ClassVar[str] = ""
    family: ClassVar[str] = ""  # 'vision' or 'text': picks the defaults of preset='auto'

    @classmethod
    def matches(cls, model: nn.Module) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def num_layers(self, model: nn.Module) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def num_protected(self, model: nn.Module) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def patch(self, model: nn.Module, settings: MergeSettings) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> nn.Module:  # pragma: no cover - interface
        """The list (ModuleList / Sequential) of the Transformer blocks that merge (FLOPs counting reads it)."""
        raise NotImplementedError

    def unpatch(self, model: nn.Module) -> None:
        """Undo a patch: only the modules tagged with this model's key (a separately patched part keeps its patch)."""
        key = get_tag(model, "key")
        for module in model.modules():
            if module is model or (key is not None and get_tag(module, "key") is key):
                remove_hooks(module)
                restore_class(module)
                clear_tags(module)


_SUBCLASSES: dict[tuple[type, type], type] = {}


def swap_class(module: nn.Module, mixin: type) -> None:
    """Give ``module`` the class ``mixin + its class`` (cached, so repeated patches reuse the class)."""
    original = module.__class__
    if is_swapped(module):
        raise RuntimeError(f"{original.__name__} is already patched")
    module.__class__ = swapped_class(mixin, original)


def swapped_class(mixin: type, original: type) -> type:
    """The cached class ``mixin + original``; it pickles by its two (importable) parents, not by name."""
    key = (mixin, original)
    if key not in _SUBCLASSES:
        namespace = {"_pitome_original_class": original, "_pitome_mixin": mixin,
                     "__module__": original.__module__, "__reduce_ex__": _reduce_swapped,
                     "__setattr__": _setattr_budget}
        forward = getattr(mixin, "forward", None)
        if forward is not None and _takes_anything(forward) and callable(getattr(original, "forward", None)):
            namespace["forward"] = _with_signature(forward, original.forward)
        _SUBCLASSES[key] = type(f"PiToMe{original.__name__}", (mixin, original), namespace)
    return _SUBCLASSES[key]


def _takes_anything(fn: Callable[..., Any]) -> bool:
    """Whether fn is ``(self, *args, **kwargs)``: a pass-through that hides the parameters it forwards."""
    kinds = [p.kind for p in list(inspect.signature(fn).parameters.values())[1:]]
    return kinds == [inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD]


def _with_signature(fn: Callable[..., Any], like: Callable[..., Any]) -> Callable[..., Any]:
    """fn showing the signature of ``like``: tools that bind inputs by name (torch.export's
    ``dynamic_shapes={"x": ...}``, ``inspect.signature``) see the original forward's parameters."""
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return fn(self, *args, **kwargs)

    forward.__signature__ = inspect.signature(like)  # type: ignore[attr-defined]
    forward.__doc__ = fn.__doc__
    return forward


BUDGET_ATTRS = ("r", "ratio")


def _setattr_budget(self: nn.Module, name: str, value: Any) -> None:
    """ToMe's habit ``model.r = 16`` on the patched model re-patches it with that budget (everything else kept);
    an invalid value raises as ``pitome.patch`` would. Other attributes are set as usual."""
    if name in BUDGET_ATTRS and get_tag(self, "adapter") is not None:
        from ..api import set_budget

        set_budget(self, **{name: value})
        return
    super(type(self), self).__setattr__(name, value)


def _reduce_swapped(self: nn.Module, protocol: int) -> tuple:
    """Pickle / deepcopy a patched module: the default reduction, with its class rebuilt from its parents
    on load (a dynamic class cannot be found by name, so ``torch.save(model)`` would fail otherwise)."""
    cls = type(self)
    _, _, *rest = object.__reduce_ex__(self, max(protocol, 2))
    return (_new_swapped, (cls.__dict__["_pitome_mixin"], cls.__dict__["_pitome_original_class"]), *rest)


def _new_swapped(mixin: type, original: type) -> nn.Module:
    cls = swapped_class(mixin, original)
    return cls.__new__(cls)


def is_swapped(module: nn.Module) -> bool:
    return "_pitome_original_class" in type(module).__dict__


def restore_class(module: nn.Module) -> None:
    if is_swapped(module):
        module.__class__ = type(module).__dict__["_pitome_original_class"]


def root_state(module: nn.Module) -> Optional[ForwardState]:
    """The running forward's state of the patched model this module belongs to (None outside one)."""
    key: Optional[RootKey] = get_tag(module, "key")
    return current_state(key) if key is not None else None


def remove_hooks(module: nn.Module) -> None:
    """Remove pitome's forward hooks (found by marker, so it also works on deep copies)."""
    for hooks in (module._forward_hooks, module._forward_pre_hooks):
        for hook_id, fn in list(hooks.items()):
            if getattr(fn, "_pitome_hook", False):
                del hooks[hook_id]


def pitome_hook(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn._pitome_hook = True  # type: ignore[attr-defined]
    return fn
