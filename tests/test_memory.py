"""retain_freed_memory: freed large tensors are reused instead of faulted in again."""

import subprocess
import sys
import textwrap

import pytest

# A loop of "forward passes" whose layers make tensors of 20-160 MB, each freed after the next
# exists; prints the minor page faults of the last five passes (after three to warm up: glibc
# needs a few rounds to grow its heap to where freed blocks coalesce and serve the next ones).
_PROBE = textwrap.dedent("""
    import resource, sys, torch
    from solov2_d2.memory import retain_freed_memory
    applied = retain_freed_memory(sys.argv[1] == "1")
    def forward():
        x = torch.empty(40 * 1024 * 1024).fill_(1.0)
        for size in (40, 20, 20, 10, 10, 5):
            y = torch.empty(size * 1024 * 1024).fill_(2.0)
            del x
            x = y
    for _ in range(3):
        forward()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        forward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    print(int(applied), after - before)
    """)


def _steady_state_faults(enable: bool):
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, "1" if enable else "0"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return bool(int(out[0])), int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_freed_memory_is_reused_without_page_faults():
    applied, faults_kept = _steady_state_faults(True)
    not_applied, faults_default = _steady_state_faults(False)
    assert applied and not not_applied
    # Five passes touch 3.5 GB, 900k pages of 4 KiB: glibc's defaults unmap every block and fault
    # it in again (measured ~700k faults; fewer only where transparent huge pages back blocks);
    # retained memory is reused (measured 0, or one stray block of ~30k while the heap settles).
    assert faults_default > 100_000
    assert faults_kept < 0.1 * faults_default


def test_environment_variable_turns_it_off(monkeypatch):
    from solov2_d2 import memory

    monkeypatch.setenv("SOLOV2_D2_RETAIN_FREED_MEMORY", "0")
    monkeypatch.setattr(memory, "_state", {"applied": False})
    assert memory.retain_freed_memory() is False


# A plain process: build the model, call it twice in eval mode on the CPU, nothing else. Prints
# whether freed memory is retained before and after, and the number of the module's log lines.
_MODEL_PROBE = textwrap.dedent("""
    import logging, sys, torch
    sys.path.insert(0, sys.argv[1])
    from detectron2.modeling import build_model
    from tests.conftest import tiny_cfg
    from solov2_d2 import memory
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("solov2_d2.memory").addHandler(handler)
    logging.getLogger("solov2_d2.memory").setLevel(logging.INFO)
    model = build_model(tiny_cfg()).eval()
    before = memory._state["applied"]
    image = torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        model([{"image": image}])
        model([{"image": image}])
    print(int(before), int(memory._state["applied"]), len(records))
    print(records[0].getMessage() if records else "")
    """)


def _model_probe(env_value):
    import os

    env = dict(os.environ)
    env.pop("SOLOV2_D2_RETAIN_FREED_MEMORY", None)
    if env_value is not None:
        env["SOLOV2_D2_RETAIN_FREED_MEMORY"] = env_value
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", _MODEL_PROBE, root],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout.splitlines()
    before, after, lines = (int(v) for v in out[0].split())
    return bool(before), bool(after), lines, out[1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_the_model_retains_freed_memory_at_its_first_cpu_inference():
    before, after, lines, message = _model_probe(None)
    assert not before and after
    assert lines == 1, "logged once over two calls"
    assert "keeps freed memory" in message and "SOLOV2_D2_RETAIN_FREED_MEMORY=0" in message


def test_the_environment_switch_keeps_the_model_off_the_setting():
    before, after, lines, message = _model_probe("0")
    assert not before and not after
    assert lines == 1 and "turned off by SOLOV2_D2_RETAIN_FREED_MEMORY" in message
