"""Bad input: one clear line, exit code 2, no traceback, nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mergebench.cli.main import cli
from mergebench.core import writer as writer_module

from conftest import load_dir, write_model


def invoke(*args: str):
    return CliRunner().invoke(cli, ["merge", *map(str, args), "-q"])


def assert_user_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert "Traceback" not in text
    assert len(text.splitlines()) == 1, text
    assert text.startswith("Error: ")
    for f in fragments:
        assert f in text, text


def no_leftovers(directory: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in directory.iterdir() if ".mergebench-tmp-" in p.name or ".mergebench-old-" in p.name]


@pytest.fixture
def env(toy_models, tmp_path):
    return toy_models, tmp_path, tmp_path / "out"


def test_path_that_does_not_exist(env):
    m, tmp, out = env
    assert_user_error(invoke("average", "-e", tmp / "nope", "-e", m["e0"], "-o", out), "nope", "no such file")
    no_leftovers(tmp, out)


def test_directory_without_weights(env):
    m, tmp, out = env
    (tmp / "empty").mkdir()
    assert_user_error(invoke("average", "-e", tmp / "empty", "-o", out), "no model weights found")
    no_leftovers(tmp, out)


def test_truncated_safetensors(env):
    m, tmp, out = env
    f = m["e1"] / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    assert_user_error(invoke("ties", "--base", m["base"], "-e", m["e0"], "-e", m["e1"], "-o", out),
                      "truncated", "model.safetensors")
    no_leftovers(tmp, out)


def test_corrupt_safetensors_header(env):
    m, tmp, out = env
    f = m["e1"] / "model.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\x00" * 64)
    assert_user_error(invoke("average", "-e", m["e0"], "-e", m["e1"], "-o", out), "corrupt safetensors header")


def test_pickled_checkpoint_without_allow_pickle(env):
    m, tmp, out = env
    (tmp / "pickled").mkdir()
    torch.save(load_dir(m["e0"]), tmp / "pickled" / "pytorch_model.bin")
    assert_user_error(invoke("average", "-e", tmp / "pickled", "-o", out), "pickled", "--allow-pickle")
    no_leftovers(tmp, out)


def test_pickled_object_refused_even_with_allow_pickle(env):
    m, tmp, out = env
    (tmp / "evil.pt").write_bytes(b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94.")
    assert_user_error(invoke("average", "-e", tmp / "evil.pt", "--allow-pickle", "-o", out), "weights_only=True")


def test_expert_missing_a_tensor(env):
    m, tmp, out = env
    t = load_dir(m["e1"])
    del t["layer.0.bias"]
    write_model(m["e1"], t)
    assert_user_error(invoke("ties", "--base", m["base"], "-e", m["e0"], "-e", m["e1"], "-o", out),
                      "expert 2", "'layer.0.bias'")


def test_expert_with_extra_tensor(env):
    m, tmp, out = env
    t = load_dir(m["e0"])
    t["extra.weight"] = torch.zeros(2)
    write_model(m["e0"], t)
    assert_user_error(invoke("ties", "--base", m["base"], "-e", m["e0"], "-o", out), "'extra.weight'")


def test_shape_mismatch_names_the_first_tensor(env):
    m, tmp, out = env
    t = load_dir(m["e1"])
    t["layer.0.weight"] = torch.zeros(16, 9)
    write_model(m["e1"], t)
    assert_user_error(invoke("ties", "--base", m["base"], "-e", m["e0"], "-e", m["e1"], "-o", out),
                      "'layer.0.weight'", "[16, 9]", "[16, 8]")


def test_different_architectures(env):
    m, tmp, out = env
    write_model(tmp / "mistral", load_dir(m["e0"]), config={"model_type": "mistral", "architectures": ["MistralForCausalLM"]})
    assert_user_error(invoke("ties", "--base", m["base"], "-e", tmp / "mistral", "-o", out), "mistral", "toy")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_an_input_names_the_tensor(env, bad):
    m, tmp, out = env
    t = load_dir(m["e1"])
    t["layer.1.weight"][2, 3] = bad
    write_model(m["e1"], t)
    assert_user_error(invoke("ties", "--base", m["base"], "-e", m["e0"], "-e", m["e1"], "-o", out),
                      "'layer.1.weight'", "NaN or Inf", "expert 2")
    no_leftovers(tmp, out)


def test_unknown_method_suggests_the_closest(env):
    m, tmp, out = env
    assert_user_error(invoke("tie", "--base", m["base"], "-e", m["e0"], "-o", out), "unknown merge method 'tie'",
                      "did you mean 'ties'")


def test_unknown_parameter_lists_valid_ones(env):
    m, tmp, out = env
    assert_user_error(invoke("ties", "--base", m["base"], "-e", m["e0"], "-p", "densty=0.3", "-o", out),
                      "'densty'", "did you mean 'density'", "lambda")


@pytest.mark.parametrize("value,fragment", [("1.5", "[0.0, 1.0]"), ("abc", "must be a float"), ("nan", "NaN")])
def test_bad_parameter_values(env, value, fragment):
    m, tmp, out = env
    assert_user_error(invoke("ties", "--base", m["base"], "-e", m["e0"], "-p", f"density={value}", "-o", out), fragment)


def test_bad_choice_and_malformed_param(env):
    m, tmp, out = env
    assert_user_error(invoke("ties", "--base", m["base"], "-e", m["e0"], "-p", "trim_scope=layer", "-o", out),
                      "tensor | global")
    assert_user_error(invoke("ties", "--base", m["base"], "-e", m["e0"], "-p", "density", "-o", out), "NAME=VALUE")


def test_zero_experts(env):
    m, tmp, out = env
    assert_user_error(invoke("ties", "--base", m["base"], "-o", out), "at least one expert")


def test_missing_base_for_a_method_that_needs_one(env):
    m, tmp, out = env
    assert_user_error(invoke("ties", "-e", m["e0"], "-o", out), "needs a base model")


def test_weights_must_match_experts(env):
    m, tmp, out = env
    assert_user_error(invoke("ties", "--base", m["base"], "-e", m["e0"], "-e", m["e1"], "-w", "1", "-o", out),
                      "one per expert")
    assert_user_error(invoke("ties", "--base", m["base"], "-e", m["e0"], "-w", "-1", "-o", out), "positive")


def test_existing_output_without_force(env):
    m, tmp, out = env
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_user_error(invoke("average", "-e", m["e0"], "-o", out), "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"


def test_output_inside_an_input_directory(env):
    m, tmp, out = env
    assert_user_error(invoke("average", "-e", m["e0"], "-e", m["e1"], "-o", m["e1"] / "merged"), "inside the input")
    assert not (m["e1"] / "merged").exists()


def test_unknown_dtype_and_device(env):
    m, tmp, out = env
    assert_user_error(invoke("average", "-e", m["e0"], "--dtype", "float8", "-o", out), "unknown dtype")
    assert_user_error(invoke("average", "-e", m["e0"], "--device", "tpu", "-o", out), "device")


def test_failure_mid_write_leaves_no_partial_output_and_keeps_the_old_target(env, monkeypatch):
    m, tmp, out = env
    out.mkdir()
    (out / "keep.txt").write_text("previous merge")
    calls = {"n": 0}
    original = writer_module.ShardWriter.write

    def failing_write(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return original(self, name, tensor)

    monkeypatch.setattr(writer_module.ShardWriter, "write", failing_write)
    result = invoke("ties", "--base", m["base"], "-e", m["e0"], "-e", m["e1"], "-o", out, "--force")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "No space left on device" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not [p for p in tmp.iterdir() if ".mergebench-" in p.name]


def test_internal_errors_are_short_unless_debug(env, monkeypatch):
    m, tmp, out = env
    import mergebench.plugins.average as average_plugin

    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(average_plugin, "weighted_sum", broken)
    result = invoke("average", "-e", m["e0"], "-e", m["e1"], "-o", out)
    assert result.exit_code == 1 and "internal error: ZeroDivisionError: boom" in result.output
    assert "Traceback" not in result.output
    no_leftovers(tmp, out)
    debug = CliRunner().invoke(cli, ["--debug", "merge", "average", "-e", str(m["e0"]), "-e", str(m["e1"]),
                                     "-o", str(out), "-q"])
    assert "Traceback" in debug.output and debug.exit_code == 1


def test_bad_recipe_keys(env):
    m, tmp, out = env
    recipe = tmp / "r.yaml"
    recipe.write_text(json.dumps({"method": "ties", "experts": [str(m["e0"])], "base": str(m["base"]), "lamda": 1}))
    assert_user_error(invoke(recipe, "-o", out), "unknown recipe key", "lamda")


def test_sigkilled_merge_leaves_nothing_that_the_next_run_keeps(toy_models, tmp_path):
    """A merge killed with SIGKILL cannot clean up; the next merge to that target removes its leftovers."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    slow = tmp_path / "slow_plugin.py"
    slow.write_text(
        "import time\n"
        "from mergebench import MergeMethod, hookimpl\n"
        "def slow(base, experts, params, ctx):\n"
        "    time.sleep(60)\n"
        "    return experts[0]\n"
        "@hookimpl\n"
        "def register_merge_methods(register):\n"
        "    register(MergeMethod(name='slow', description='sleeps', merge=slow, needs_base=False))\n")
    code = ("import sys; sys.path.insert(0, %r); import slow_plugin; "
            "from mergebench.core.plugin_manager import get_plugin_manager; "
            "get_plugin_manager().register(slow_plugin, name='slow'); "
            "from mergebench.cli.main import main; "
            "sys.argv = ['mergebench', 'merge', 'slow', '-e', %r, '-e', %r, '-o', %r, '-q']; main()"
            ) % (str(tmp_path), str(toy_models["e0"]), str(toy_models["e1"]), str(out))
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "MERGEBENCH_LOAD_PLUGINS": ""})
    deadline = time.time() + 30
    while time.time() < deadline and not [p for p in tmp_path.iterdir() if ".mergebench-tmp-" in p.name]:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    leftovers = [p for p in tmp_path.iterdir() if ".mergebench-tmp-" in p.name]
    assert leftovers and not out.exists()  # killed mid-merge: a temporary directory, no output
    result = invoke("average", "-e", toy_models["e0"], "-o", out)
    assert result.exit_code == 0, result.output
    assert not [p for p in tmp_path.iterdir() if ".mergebench-tmp-" in p.name]
    assert (out / "model.safetensors").is_file()


def _run_main(tmp_path, argv: list[str], prelude: str = ""):
    """``mergebench ARGV`` through the console script's ``main()`` in a fresh interpreter, after ``prelude``;
    tmp_path/atexit is written by an atexit handler (which also writes "bye" to stdout, unflushed), tmp_path/shutdown
    by the interpreter's own shutdown (the callback that ``concurrent.futures`` uses to join its threads, which
    ``os._exit`` skips)."""
    import os
    import subprocess
    import sys

    code = (f"import atexit, sys, threading, time\n"
            f"atexit.register(lambda: (open({str(tmp_path / 'atexit')!r}, 'w').close(), sys.stdout.write('bye')))\n"
            f"threading._register_atexit(lambda: open({str(tmp_path / 'shutdown')!r}, 'w').close())\n"
            f"from mergebench.cli.main import main\n"
            f"{prelude}\n"
            f"sys.argv = ['mergebench', *{argv!r}]\n"
            f"main()\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout block-buffered, as usual
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**env, "MERGEBENCH_LOAD_PLUGINS": ""})


def test_a_finished_command_leaves_at_once_after_atexit_handlers_with_its_output_whole(tmp_path):
    """The interpreter's teardown (0.12-0.16 s after a merge) is skipped: module globals are not freed; atexit
    handlers still run, the whole output arrives through a pipe, and the exit status is the command's."""
    from mergebench.core.plugin_manager import make_plugin_manager

    done = _run_main(tmp_path, ["methods"])
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "atexit").exists() and not (tmp_path / "shutdown").exists()
    assert all(name in done.stdout for name in make_plugin_manager(entry_points=False).merge_methods().names())
    assert done.stdout.rstrip().splitlines()[-2].startswith("└") and done.stdout.endswith("bye")
    failed = _run_main(tmp_path, ["merge", "no-such-method", "-e", str(tmp_path), "-o", str(tmp_path / "o")])
    assert failed.returncode == 2 and failed.stderr.startswith("Error: ") and len(failed.stderr.splitlines()) == 1


def test_a_command_that_leaves_a_thread_running_ends_as_the_interpreter_does(tmp_path):
    """A thread the interpreter would wait for (a plugin's, say) is waited for: the usual exit, teardown included."""
    late = tmp_path / "late"
    prelude = (f"threading.Thread(target=lambda: (time.sleep(1.0), open({str(late)!r}, 'w').close())).start()")
    done = _run_main(tmp_path, ["methods"], prelude)
    assert done.returncode == 0, done.stderr
    assert late.exists() and (tmp_path / "atexit").exists() and (tmp_path / "shutdown").exists()
