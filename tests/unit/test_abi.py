"""The Python mirror (bdr.kernel.abi) must match kernel/bdr_uapi.h: a C probe prints every size, offset and number."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from bdr.kernel import abi

HEADER = Path(__file__).resolve().parents[2] / "kernel" / "bdr_uapi.h"

STRUCTS = {
    "bdr_record": abi.Record,
    "bdr_ring_ctl": abi.RingCtl,
    "bdr_info": abi.Info,
    "bdr_status": abi.Status,
    "bdr_dirty": abi.Dirty,
    "bdr_meta_header": abi.MetaHeader,
    "bdr_track": abi.Track,
    "bdr_track_clear": abi.TrackClear,
}
CONSTANTS = {
    "BDR_MAGIC": abi.BDR_MAGIC,
    "BDR_ABI_VERSION": abi.BDR_ABI_VERSION,
    "BDR_SLOT_DATA": abi.BDR_SLOT_DATA,
    "BDR_SECTOR_SHIFT": abi.BDR_SECTOR_SHIFT,
    "BDR_DEFAULT_REGION_SECTORS": abi.BDR_DEFAULT_REGION_SECTORS,
    "BDR_MAX_SLOTS": abi.BDR_MAX_SLOTS,
    "BDR_NAME_MAX": abi.BDR_NAME_MAX,
    "BDR_OP_WRITE": abi.Op.WRITE,
    "BDR_OP_FLUSH": abi.Op.FLUSH,
    "BDR_OP_DISCARD": abi.Op.DISCARD,
    "BDR_OP_WRITE_ZEROES": abi.Op.WRITE_ZEROES,
    "BDR_REC_FUA": abi.RecFlag.FUA,
    "BDR_REC_CONT": abi.RecFlag.CONT,
    "BDR_REC_MORE": abi.RecFlag.MORE,
    "BDR_STATE_OVERFLOW": abi.State.OVERFLOW,
    "BDR_STATE_DIRTY": abi.State.DIRTY,
    "BDR_STATE_DEAD": abi.State.DEAD,
    "BDR_STATE_RECOVERED": abi.State.RECOVERED,
    "BDR_META_MAGIC": abi.BDR_META_MAGIC,
    "BDR_META_VERSION": abi.BDR_META_VERSION,
    "BDR_META_BLOCK": abi.BDR_META_BLOCK,
    "BDR_TRACK_ENABLED": abi.TrackFlag.ENABLED,
    "BDR_TRACK_RECOVERED": abi.TrackFlag.RECOVERED,
    "BDR_TRACK_FAILED": abi.TrackFlag.FAILED,
    "BDR_IOC_TRACK_INFO": abi.BDR_IOC_TRACK_INFO,
    "BDR_IOC_TRACK_CLEAR": abi.BDR_IOC_TRACK_CLEAR,
    "BDR_IOC_TRACK_ROTATE": abi.BDR_IOC_TRACK_ROTATE,
    "BDR_IOC_INFO": abi.BDR_IOC_INFO,
    "BDR_IOC_STATUS": abi.BDR_IOC_STATUS,
    "BDR_IOC_TAKE_DIRTY": abi.BDR_IOC_TAKE_DIRTY,
}


def _probe_source() -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        f'#include "{HEADER}"',
        "int main(void) {",
        'printf("{");',
    ]
    for cname, py in STRUCTS.items():
        lines.append(f'printf("\\"sizeof {cname}\\": %zu,", sizeof(struct {cname}));')
        for field, _ in py._fields_:
            lines.append(f'printf("\\"{cname}.{field}\\": %zu,", offsetof(struct {cname}, {field}));')
    for name in CONSTANTS:
        lines.append(f'printf("\\"{name}\\": %llu,", (unsigned long long)({name}));')
    lines += ['printf("\\"end\\": 0}");', "return 0; }"]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed to check the ABI mirror"
    d = tmp_path_factory.mktemp("probe")
    (d / "probe.c").write_text(_probe_source())
    subprocess.run([cc, "-Wall", "-Werror", "-o", str(d / "probe"), str(d / "probe.c")], check=True)
    out = subprocess.run([str(d / "probe")], check=True, capture_output=True, text=True).stdout
    result: dict[str, int] = json.loads(out)
    return result


@pytest.mark.parametrize("cname", sorted(STRUCTS))
def test_struct_layout_matches_header(probe: dict[str, int], cname: str) -> None:
    py = STRUCTS[cname]
    assert ctypes.sizeof(py) == probe[f"sizeof {cname}"]
    for field, _ in py._fields_:
        assert getattr(py, field).offset == probe[f"{cname}.{field}"], field


@pytest.mark.parametrize("name", sorted(CONSTANTS))
def test_constant_matches_header(probe: dict[str, int], name: str) -> None:
    assert int(CONSTANTS[name]) == probe[name]


def test_every_header_define_is_mirrored() -> None:
    """A new #define in the header must get a Python twin (and a line in CONSTANTS)."""
    defines = {
        line.split()[1]
        for line in HEADER.read_text().splitlines()
        if line.startswith("#define BDR_") and "(" not in line.split()[1]
    }
    enum_values = {f"BDR_OP_{op.name}" for op in abi.Op}
    missing = defines - set(CONSTANTS) - {"BDR_IOC_MAGIC"} - enum_values
    assert not missing, f"not mirrored in bdr.kernel.abi: {sorted(missing)}"
    assert abi.BDR_IOC_MAGIC == 0xBD
