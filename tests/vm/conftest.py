"""Fixtures of the QEMU test lab (see tests/vm/lab.py).

- `guest`: one booted Guest per test module.  A module sets `VM_DISKS` (name -> size, default
  {"src": "64M", "dst": "64M"}), `VM_MEMORY` (default "1536M") and `VM_DISCARD` (name -> QEMU discard mode,
  default "unmap") to shape it.
- `bdr_ko`: the bdr module, built once per session against the 6.12 headers; its path is the same on the
  host and in the guest.
- After every test that used the guest, the guest kernel log is checked: an oops, BUG or WARN since the
  previous check fails that test.

Missing QEMU, kernel or headers make these tests fail (never skip): run `make deps`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm import lab

DEFAULT_DISKS = {"src": "64M", "dst": "64M"}
DEFAULT_MEMORY = "1536M"
_VM_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _VM_DIR in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.vm)


@pytest.fixture(scope="session")
def lab_kernel() -> str:
    """Version of the 6.12 kernel the lab boots (and builds modules against)."""
    try:
        return lab.check_prerequisites()
    except lab.LabSetupError as exc:
        problem = str(exc)
    pytest.fail(f"VM test lab unavailable: {problem}", pytrace=False)


@pytest.fixture(scope="session")
def bdr_ko(lab_kernel: str) -> Path:
    """kernel/bdr.ko, built (incrementally) once per session."""
    try:
        return lab.build_module(lab.REPO, lab_kernel)
    except lab.BuildError as exc:
        problem = str(exc)
    pytest.fail(f"the bdr kernel module does not build:\n{problem}", pytrace=False)


@pytest.fixture(scope="module")
def guest(request: pytest.FixtureRequest, lab_kernel: str) -> Iterator[lab.Guest]:
    disks = getattr(request.module, "VM_DISKS", DEFAULT_DISKS)
    memory = getattr(request.module, "VM_MEMORY", DEFAULT_MEMORY)
    discard = getattr(request.module, "VM_DISCARD", None)
    try:
        g = lab.boot(disks=disks, memory=memory, kver=lab_kernel, discard=discard)
    except lab.LabSetupError as exc:
        problem = f"VM test lab unavailable: {exc}"
    except lab.GuestError as exc:
        problem = f"the VM test lab guest did not boot:\n{exc}"
    else:
        with g:
            yield g
        return
    pytest.fail(problem, pytrace=False)


@pytest.fixture(autouse=True)
def guest_kernel_log_is_clean(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test that used the guest: fail on an oops/BUG/WARN in the guest kernel log."""
    yield
    __tracebackhide__ = True
    g = request.node.funcargs.get("guest") if hasattr(request.node, "funcargs") else None
    if isinstance(g, lab.Guest) and g.alive:
        g.check_kernel_log()
