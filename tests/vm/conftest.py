"""Fixtures of the QEMU test lab (see tests/vm/lab.py).

- `guest`: one booted Guest per test module.  A module sets `VM_DISKS` (name -> size, default
  {"src": "64M", "dst": "64M"}), `VM_MEMORY` (default "1536M") and `VM_DISCARD` (name -> QEMU discard mode,
  default "unmap") to shape it.
- `lab_kernel`: the version of the kernel the module's guest boots: the 6.12 one, or, in a module that sets
  `VM_KERNELS = ("6.12", "7.x")`, each of them in turn (tests get the ids [6.12] and [7.x], and each kernel
  boots one guest for the module).  "7.x" is the newest kernel of the lab's trixie chroot (`make lab-chroot`).
- `bdr_ko`: the bdr module, built (once per session and kernel) against that kernel's headers; its path is the
  same on the host and in the guest.  BDR_LAB_MODULE_SRC=<dir> builds it from <dir> (laid out like kernel/)
  instead of the repository's kernel/.
- After every test that used the guest, the guest kernel log is checked: an oops, BUG or WARN since the
  previous check fails that test.

Missing QEMU, kernel or headers make these tests fail (never skip): run `make deps` (and `make lab-chroot`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm import lab

DEFAULT_DISKS = {"src": "64M", "dst": "64M"}
DEFAULT_MEMORY = "1536M"
_VM_DIR = Path(__file__).resolve().parent
_built: dict[str, Path] = {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the lab's tests ``vm``; a test marked ``kernels(SERIES...)`` runs only on those of its module's
    VM_KERNELS (for what does not depend on the kernel: it is deselected, and counted so, on the others)."""
    keep, dropped = [], []
    for item in items:
        if _VM_DIR in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.vm)
        only = item.get_closest_marker("kernels")
        callspec = getattr(item, "callspec", None)
        if only is not None and callspec is not None and callspec.params.get("lab_series") not in only.args:
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A module's VM_KERNELS runs its guest tests once per kernel series, grouped by series."""
    series = getattr(metafunc.module, "VM_KERNELS", None)
    if series and "lab_series" in metafunc.fixturenames:
        unknown = [s for s in series if s not in lab.LAB_SERIES]
        if unknown:
            raise pytest.UsageError(
                f"{metafunc.module.__name__}.VM_KERNELS: unknown {unknown}: use {lab.LAB_SERIES}"
            )
        metafunc.parametrize("lab_series", series, indirect=True, scope="module")


@pytest.fixture(scope="module")
def lab_series(request: pytest.FixtureRequest) -> str:
    """The kernel series of the module's guest: "6.12", or the one of VM_KERNELS the tests run with now."""
    return str(getattr(request, "param", lab.KERNEL_SERIES))


@pytest.fixture(scope="module")
def lab_kernel(lab_series: str) -> str:
    """Version of the kernel the lab boots (and builds modules against)."""
    try:
        return lab.check_prerequisites(lab_series)
    except lab.LabSetupError as exc:
        problem = str(exc)
    pytest.fail(f"VM test lab unavailable ({lab_series} kernel): {problem}", pytrace=False)


@pytest.fixture(scope="module")
def bdr_ko(lab_kernel: str) -> Path:
    """bdr.ko for lab_kernel, built (incrementally) once per session."""
    if lab_kernel in _built:
        return _built[lab_kernel]
    try:
        _built[lab_kernel] = lab.build_module(lab.REPO, lab_kernel, kernel_dir=lab.module_sources())
    except lab.BuildError as exc:
        problem = str(exc)
    else:
        return _built[lab_kernel]
    pytest.fail(f"the bdr kernel module does not build for {lab_kernel}:\n{problem}", pytrace=False)


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
