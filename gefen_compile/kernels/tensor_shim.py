"""The steady step's per-tensor reads (kernels/prepared.py) through torch's stable C shim, where
it can be trusted.

Each step reads, for every parameter and its gradient, dtype, layout, memory order, size and
data pointer. As method calls these cost ~80 ns each, ~0.5 us per parameter; the functions of
torch's C shim (``torch/csrc/inductor/aoti_torch/c/shim.h``, the stable ABI that AOTInductor's
compiled models call, exported by libtorch) answer in a few ns, from a handle to the tensor's
``at::Tensor``. A ``torch.Tensor`` object holds that ``at::Tensor`` at a fixed offset, which
the C extension does not know (it is built without torch's headers, and the offset differs
between torch versions), so :func:`bind` finds it here: the one pointer-sized word of the
object that holds the tensor's ``TensorImpl`` address (``Tensor._cdata``) in every probe. Each
shim function is then asked about probes of every kind the step meets and must give Python's
answers; if anything is missing or differs, the step keeps the method calls. The shim does not
report a tensor's negation bit (a ``torch._neg_view``, whose memory holds the negated values):
the one bit of its ``TensorImpl`` that every probe's negated view sets is found the same way.

Two more things make the many-tensor step cheaper, each checked the same way: the words of a
``TensorImpl`` (and of its autograd meta) that lead to the objects the step reads, which it asks
the caches for ahead of their use; and libtorch's ``bump_version``, which bumps each stepped
parameter's version counter as it is checked, instead of a second pass over cold tensors.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import torch

_log = logging.getLogger("gefen_compile")
_WORD = ctypes.sizeof(ctypes.c_void_p)
# The shim functions step_tables calls, in bind_shim's order, and their result types.
FUNCTIONS = {
    "aoti_torch_get_layout": ctypes.c_int32,
    "aoti_torch_get_dtype": ctypes.c_int32,
    "aoti_torch_is_contiguous": ctypes.c_bool,
    "aoti_torch_get_numel": ctypes.c_int64,
    "aoti_torch_get_data_ptr": ctypes.c_void_p,
    "aoti_torch_get_device_type": ctypes.c_int32,
    "aoti_torch_get_device_index": ctypes.c_int32,
}
# The types whose objects are read through the shim: the plain ones (subclasses may override
# what the shim bypasses).
TYPES = (torch.Tensor, torch.nn.Parameter)
DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
          torch.float64: "float64"}
# dtype -> its code in the shim, for step_tables; empty while the shim is not bound.
codes: dict[torch.dtype, int] = {}
# device type -> its code in the shim (the types a bucket's step takes the C call on).
device_codes: dict[str, int] = {}


def _library() -> ctypes.CDLL | None:
    """libtorch's CPU library, already loaded by torch (None where it has another name)."""
    for path in sorted((Path(torch.__file__).parent / "lib").glob("*torch_cpu.*")):
        try:
            return ctypes.CDLL(str(path))
        except OSError:
            continue
    return None


def _probes() -> list[torch.Tensor]:
    """Tensors of every kind the step reads: plain and Parameter, views (offset, transposed),
    each state dtype, an empty one; on the CPU whatever the default device (the data pointers
    must be real ones)."""
    cpu = torch.device("cpu")
    return [torch.arange(6.0, device=cpu), torch.nn.Parameter(torch.ones(3, 5, device=cpu)),
            torch.zeros(4, 6, device=cpu).t(),
            torch.zeros(9, dtype=torch.bfloat16, device=cpu)[2:],
            torch.zeros(2, 3, dtype=torch.float16, device=cpu),
            torch.zeros(5, dtype=torch.float64, device=cpu), torch.zeros(0, device=cpu)]


def _offset(probes: list[torch.Tensor]) -> int | None:
    """The offset of the word holding each probe's TensorImpl address, if one offset does in
    every probe (the object header, refcount and type, excluded)."""
    size = torch._C.TensorBase.__basicsize__
    found = set(range(2 * _WORD, size - _WORD + 1, _WORD))
    for t in probes:
        words = (ctypes.c_size_t * (size // _WORD)).from_address(id(t))
        found &= {k * _WORD for k, word in enumerate(words) if word == t._cdata}
    return found.pop() if len(found) == 1 else None


# Words of a TensorImpl searched for its negation bit: its bit fields end the object, 176
# bytes in torch 2.13 (the bit is in word 21); a word past it would be the next allocation's.
_IMPL_WORDS = 22


def _impl_words(t: torch.Tensor) -> list[int]:
    return list((ctypes.c_uint64 * _IMPL_WORDS).from_address(t._cdata))


def _negation_bit(probes: list[torch.Tensor]) -> tuple[int, int] | None:
    """The offset of the TensorImpl word holding the negation bit (``torch._neg_view``, whose
    memory holds the negated values; the shim does not report it), and that bit: the one word
    and bit in which every probe's negated view differs from its plain views, set in the
    negated one only. Only words that two plain views of the probe (all three alive) agree on
    count: a word holding an object's own address (its Python object, say) differs between
    views, and may differ from the negated view's by one bit by chance of allocation."""
    found = None
    for t in probes:
        views = (t.view_as(t), t.view_as(t), torch._neg_view(t))
        plain, twin, negated = map(_impl_words, views)
        flips = {(k * _WORD, a ^ b) for k, (a, b, c) in enumerate(zip(plain, negated, twin))
                 if a == c and (a ^ b).bit_count() == 1 and b & (a ^ b)}
        found = flips if found is None else found & flips
    return found.pop() if found and len(found) == 1 else None


def _pointer_words(probes: list[torch.Tensor]) -> tuple[int, int, int, int, int]:
    """Where step_tables finds the objects it asks the caches for ahead of their use: the
    offsets of the TensorImpl words that point to its storage, autograd meta, version counter
    and Python object, and of the autograd meta's word that points to the gradient's TensorImpl
    (-1 where no one word does in every probe). The storage's address is
    ``untyped_storage()._cdata``, the Python object's ``id(t)``; the counter's word is shared by
    a tensor, its views and its detached alias (they share the counter), differs between
    tensors and is zero in an inference tensor (which has none); the autograd meta's is zero in
    a plain tensor and differs between parameters (each has its own); the gradient's word is
    read back, through /proc/self/mem (an address that is not one fails there, rather than
    ending the process), from the meta of parameters with gradients."""
    with torch.inference_mode():
        inference = torch.zeros(3, device="cpu")
    params = [torch.nn.Parameter(torch.zeros(2, device="cpu")) for _ in range(3)]
    for p in params:
        p.grad = torch.ones_like(p)
    plain, without, *with_meta = map(_impl_words, (torch.zeros(3, device="cpu"), inference, *params))
    words = [_impl_words(t) for t in probes]
    aliases = [(_impl_words(t.view_as(t)), _impl_words(t.detach())) for t in probes]
    found = (
        {k for k in range(_IMPL_WORDS)
         if all(w[k] == t.untyped_storage()._cdata for w, t in zip(words, probes))},
        {k for k in range(_IMPL_WORDS)
         if plain[k] == 0 and all(w[k] for w in with_meta)
         and len({w[k] for w in with_meta}) == len(with_meta)},
        {k for k in range(_IMPL_WORDS)
         if without[k] == 0 and len({w[k] for w in words}) == len(words)
         and all(w[k] and w[k] == view[k] == alias[k] for w, (view, alias) in zip(words, aliases))},
        {k for k in range(_IMPL_WORDS) if all(w[k] == id(t) for w, t in zip(words, probes))},
    )
    storage, meta, counter, owner = (f.pop() * _WORD if len(f) == 1 else -1 for f in found)
    grad = -1
    if meta >= 0:
        metas = [_read_words(w[meta // _WORD], _META_WORDS) for w in with_meta]
        if all(metas):
            at = {k for k in range(_META_WORDS)
                  if all(m[k] == p.grad._cdata for m, p in zip(metas, params))}
            grad = at.pop() * _WORD if len(at) == 1 else -1
    return storage, meta, counter, owner, grad


# Words of an AutogradMeta searched for its gradient's (the fifth in torch 2.13).
_META_WORDS = 16


def _read_words(address: int, count: int) -> tuple[int, ...] | None:
    """``count`` words of this process's memory at ``address``; None where they cannot be read
    (not mapped, or no /proc/self/mem: not Linux)."""
    try:
        with open("/proc/self/mem", "rb", buffering=0) as memory:
            memory.seek(address)
            data = memory.read(count * _WORD)
    except (OSError, ValueError, OverflowError):
        return None
    return tuple((ctypes.c_uint64 * count).from_buffer_copy(data)) if len(data) == count * _WORD else None


# torch::autograd::impl::bump_version(const at::Tensor &): what an in-place op calls.
_BUMP = "_ZN5torch8autograd4impl12bump_versionERKN2at6TensorE"


def _bump(library: ctypes.CDLL, offset: int, counter: int, probes: list[torch.Tensor]) -> int:
    """The address of libtorch's bump_version, where each probe's version (and its view's) goes
    up by exactly one when it is called on the probe, and no other probe's; else 0."""
    function = getattr(library, _BUMP, None)
    if function is None or counter < 0:
        return 0
    function.restype, function.argtypes = None, [ctypes.c_void_p]
    views = [t.view_as(t) for t in probes]
    for t in probes:
        before = [u._version for u in probes]
        function(id(t) + offset)
        if [u._version - b for u, b in zip(probes, before)] != [int(u is t) for u in probes]:
            return 0
    if any(v._version != t._version for v, t in zip(views, probes)):
        return 0
    return ctypes.cast(function, ctypes.c_void_p).value


def _answers(library: ctypes.CDLL, t: torch.Tensor, offset: int) -> tuple:
    """What the shim says of t: layout, dtype, contiguous, numel, data pointer, device type
    and index."""
    results = []
    for name, kind in FUNCTIONS.items():
        value = kind()
        if getattr(library, name)(ctypes.c_void_p(id(t) + offset), ctypes.byref(value)) != 0:
            raise RuntimeError(f"{name} failed")
        results.append(value.value or 0)
    return tuple(results)


def bind(bind_shim) -> bool:
    """Hand the shim to the C extension's ``bind_shim`` where every check passes; True then."""
    library = _library()
    try:
        if library is None:
            raise RuntimeError("no libtorch_cpu library found")
        dtype_codes = {d: getattr(library, f"aoti_torch_dtype_{name}")() for d, name in DTYPES.items()}
        types = {kind: getattr(library, f"aoti_torch_device_type_{kind}")() for kind in ("cpu", "cuda")}
        strided = library.aoti_torch_layout_strided()
        for name, kind in FUNCTIONS.items():
            getattr(library, name).restype = ctypes.c_int32
        probes = _probes()
        offset = _offset(probes)
        if offset is None:
            raise RuntimeError("no one offset holds every probe's TensorImpl")
        negation = _negation_bit(probes)
        if negation is None:
            raise RuntimeError("no one TensorImpl bit marks every probe's negated view")
        for t in probes:
            expected = (strided, dtype_codes[t.dtype], t.is_contiguous(), t.numel(), t.data_ptr(),
                        types["cpu"], -1 if t.device.index is None else t.device.index)
            if _answers(library, t, offset) != expected:
                raise RuntimeError(f"the shim's answers for a {t.dtype} tensor differ from Python's")
    except (AttributeError, RuntimeError) as error:  # a torch without the shim, or changed
        _log.debug("the prepared step reads tensors through method calls: %s", error)
        return False
    pointers = _pointer_words(probes)
    bind_shim(offset, TYPES, strided, *negation,
              *(ctypes.cast(getattr(library, name), ctypes.c_void_p).value for name in FUNCTIONS),
              *pointers, _bump(library, offset, pointers[2], probes))
    codes.update(dtype_codes)
    device_codes.update(types)
    return True
