"""The Python copies of the C ABI match csrc/aqua_alloc.h, the one source.

Python declares what the header says in two places: aqua_alloc/memory/native.py (status
codes, backends, driver ops, tiers, move phases, the two structs, every function signature)
and aqua_alloc/obs/events.py (the core's event kinds). Nothing else ties them: a value
changed on one side would make the core and Python disagree silently. So this test reads
the header, asks a C compiler for every constant's value and every struct field's offset
(a small program that includes the header and prints them), and compares each copy.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from aqua_alloc.memory import native
from aqua_alloc.obs import events

HEADER = Path(__file__).resolve().parent.parent / "csrc" / "aqua_alloc.h"
TEXT = HEADER.read_text()
# Comments out, so that names inside them are not read as declarations.
CODE = re.sub(r"/\*.*?\*/", "", TEXT, flags=re.S)


def header_enums() -> dict[str, list[str]]:
    """enum name -> its constant names, in order."""
    return {m.group(1): re.findall(r"\b(AQUA_[A-Z0-9_]+)\s*=", m.group(2))
            for m in re.finditer(r"enum\s+(\w+)\s*\{(.*?)\}", CODE, flags=re.S)}


def header_structs() -> dict[str, list[tuple[str, str]]]:
    """typedef'd struct name -> [(C type, field name)], in order."""
    return {m.group(1): re.findall(r"(\w+)\s+(\w+)\s*;", m.group(2))
            for m in re.finditer(r"typedef\s+struct\s+(\w+)\s*\{(.*?)\}", CODE, flags=re.S)}


def header_defines() -> list[str]:
    return re.findall(r"#define\s+(AQUA_TIER_\w+)", CODE)


def header_functions() -> dict[str, tuple[str, list[str]]]:
    """exported function -> (return type, [parameter types]), types with spaces normalized."""
    out = {}
    for m in re.finditer(r"AQUA_EXPORT\s+([\w\s\*]+?)\s*\b(aqua_\w+)\s*\((.*?)\)\s*;", CODE, flags=re.S):
        params = [] if m.group(3).strip() in ("", "void") else [p.strip() for p in m.group(3).split(",")]
        # A parameter is "type name": drop the name, keep the type with its stars.
        types = [re.sub(r"\s*\*\s*", "*", re.sub(r"\s+\w+$", "", " ".join(p.split()))) for p in params]
        out[m.group(2)] = (re.sub(r"\s*\*\s*", "*", " ".join(m.group(1).split())), types)
    return out


@pytest.fixture(scope="module")
def compiled() -> dict[str, int]:
    """Every enum constant, define, struct size and field offset, as the compiler sees them."""
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        pytest.skip("needs a C compiler (cc, gcc or clang) to read the header's values")
    names = [n for consts in header_enums().values() for n in consts] + header_defines()
    lines = [f'printf("{n} %lld\\n", (long long)({n}));' for n in names]
    for struct, fields in header_structs().items():
        lines.append(f'printf("sizeof:{struct} %zu\\n", sizeof({struct}));')
        lines += [f'printf("offsetof:{struct}.{f} %zu\\n", offsetof({struct}, {f}));' for _, f in fields]
    source = ("#include <stdio.h>\n#include <stddef.h>\n#include \"aqua_alloc.h\"\nint main(void) {\n"
              + "\n".join(lines) + "\nreturn 0;\n}\n")
    build = Path(subprocess.run(["mktemp", "-d"], capture_output=True, text=True, check=True).stdout.strip())
    try:
        (build / "abi.c").write_text(source)
        subprocess.run([compiler, "-I", str(HEADER.parent), "-o", str(build / "abi"), str(build / "abi.c")],
                       check=True, capture_output=True, text=True)
        printed = subprocess.run([str(build / "abi")], capture_output=True, text=True, check=True).stdout
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return {name: int(value) for name, value in (line.split() for line in printed.splitlines())}


def test_the_header_is_read_whole():
    # Guards the parsers above: the counts of what they find, exactly.
    assert sorted(header_enums()) == ["aqua_backend_kind", "aqua_event_kind", "aqua_op", "aqua_phase", "aqua_status"]
    assert sorted(header_structs()) == ["aqua_event", "aqua_tier_stats"]
    assert header_defines() == ["AQUA_TIER_HOST", "AQUA_TIER_AUTO", "AQUA_TIER_NONE"]
    assert len(header_functions()) == len(re.findall(r"AQUA_EXPORT\s+[\w\s\*]+\(", CODE)) - 1  # less the #define


def python_enum(prefix: str, enum_cls) -> dict[str, int]:
    return {f"{prefix}{member.name}": member.value for member in enum_cls}


def test_status_codes(compiled):
    expected = {name: compiled[name] for name in header_enums()["aqua_status"]}
    python = {("AQUA_OK" if m.name == "OK" else f"AQUA_ERR_{m.name}"): m.value for m in native.Status}
    assert python == expected


def test_backends_ops_and_tiers(compiled):
    assert python_enum("AQUA_BACKEND_", native.Backend) == {
        n: compiled[n] for n in header_enums()["aqua_backend_kind"]}
    ops = {n: compiled[n] for n in header_enums()["aqua_op"] if n != "AQUA_OP_COUNT"}
    assert python_enum("AQUA_OP_", native.Op) == ops
    assert {n: compiled[n] for n in header_defines()} == {
        "AQUA_TIER_HOST": native.TIER_HOST, "AQUA_TIER_AUTO": native.TIER_AUTO, "AQUA_TIER_NONE": native.TIER_NONE}


def test_move_phases_in_order(compiled):
    phases = {compiled[n]: n.removeprefix("AQUA_PHASE_").lower()
              for n in header_enums()["aqua_phase"] if n != "AQUA_PHASE_COUNT"}
    assert tuple(phases[i] for i in range(len(phases))) == native.PHASES
    assert compiled["AQUA_PHASE_COUNT"] == len(native.PHASES)


def test_event_kinds(compiled):
    header = {compiled[n]: n.removeprefix("AQUA_EV_").lower() for n in header_enums()["aqua_event_kind"]}
    assert {code: kind.value for code, kind in events.CORE_KIND_CODES.items()} == header


@pytest.mark.parametrize("struct, cls", [("aqua_event", native.CoreEvent), ("aqua_tier_stats", native.TierStats)])
def test_structs_field_by_field(compiled, struct, cls):
    ctypes_of = {"uint64_t": ctypes.c_uint64, "int32_t": ctypes.c_int32}
    fields = header_structs()[struct]
    assert [name for name, _ in cls._fields_] == [name for _, name in fields]
    for (c_type, name), (_, py_type) in zip(fields, cls._fields_):
        assert py_type is ctypes_of[c_type], f"{struct}.{name}: {c_type} in C, {py_type.__name__} in Python"
        assert getattr(cls, name).offset == compiled[f"offsetof:{struct}.{name}"], f"{struct}.{name}"
    assert ctypes.sizeof(cls) == compiled[f"sizeof:{struct}"]


# C parameter and return types -> the ctypes type native.py must declare for them.
_CTYPES = {
    "int": ctypes.c_int, "uint64_t": ctypes.c_uint64, "uint32_t": ctypes.c_uint32, "double": ctypes.c_double,
    "size_t": ctypes.c_size_t, "void*": ctypes.c_void_p, "const char*": ctypes.c_char_p,
    "int*": ctypes.POINTER(ctypes.c_int), "uint64_t*": ctypes.POINTER(ctypes.c_uint64),
    "uint32_t*": ctypes.POINTER(ctypes.c_uint32), "const uint64_t*": ctypes.POINTER(ctypes.c_uint64),
    "const uint8_t*": ctypes.POINTER(ctypes.c_uint8), "aqua_event*": ctypes.POINTER(native.CoreEvent),
    "aqua_tier_stats*": ctypes.POINTER(native.TierStats), "void": None,
}


def test_every_export_is_declared_once_with_its_types():
    functions = header_functions()
    assert sorted(native._SIGNATURES) == sorted(functions), "native.py declares exactly the header's exports"
    for name, (restype, argtypes) in native._SIGNATURES.items():
        c_return, c_params = functions[name]
        assert restype is _CTYPES[c_return], f"{name} returns {c_return}"
        assert list(argtypes) == [_CTYPES[t] for t in c_params], f"{name}({', '.join(c_params)})"


def test_the_built_library_exports_every_declared_symbol():
    lib = ctypes.CDLL(native.library_path())
    missing = [name for name in native._SIGNATURES if not hasattr(lib, name)]
    assert missing == []
