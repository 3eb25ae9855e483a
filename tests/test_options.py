"""Options: built once from the command line into frozen objects whose defaults are the only ones."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from schedsearch import cli, measure
from schedsearch.errors import UserError
from schedsearch.options import (Evaluation, LLMOptions, Tuning, evaluation_options, llm_options, strategy_options,
                                 tuning_options)


def parse(*argv):
    return cli.parser().parse_args(list(argv))


def test_every_command_line_default_is_the_option_objects_default():
    tune, compare, run = parse("tune", "w.py"), parse("compare", "w.py", "-o", "out"), parse("run", "dist")
    assert tuning_options(tune, tune.strategy, tune.seed) == tuning_options(compare, "ansor", 0) == Tuning()
    assert evaluation_options(tune) == evaluation_options(compare) == evaluation_options(run) == Evaluation()
    assert llm_options(tune) == llm_options(compare) == LLMOptions()


def test_the_code_behind_an_option_defaults_to_the_command_lines_default():
    """Where a function or strategy that an option reaches has a default of its own, it is the option's."""
    import inspect

    from schedsearch import library, llm_bridge, llm_client, validate
    from schedsearch.strategies.hybrid import HybridOptions
    from schedsearch.strategies.llm import LLMProposer

    tune, bridge = parse("tune", "w.py"), parse("llm-bridge", "box")
    default = lambda f, name: inspect.signature(f).parameters[name].default
    assert HybridOptions().stall_trials == tune.hybrid_stall_trials
    assert [default(LLMProposer, k) for k in ("ideas", "programs_per_idea", "temperature", "exchange")] == [
        tune.llm_ideas, tune.llm_programs_per_idea, tune.llm_temperature, tune.llm_exchange]
    assert default(llm_client.make_client, "concurrency") == tune.llm_concurrency
    assert default(llm_client.make_client, "timeout_s") == tune.llm_timeout
    assert default(validate.validate, "seeds") == tune.validation_seeds
    assert default(llm_bridge.Bridge.serve, "poll_s") == bridge.poll
    assert library.load(None, "llvm").requested == tune.library


def test_strategy_options_are_what_results_json_recorded(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    args = parse("tune", "w.py", "--strategy", "llm", "--llm-concurrency", "3", "--no-wait")
    llm = llm_options(args)
    assert list(strategy_options(args, "llm", llm).items()) == [
        ("llm", "openai"), ("llm_model", None), ("concurrency", 3), ("ideas", 4), ("programs_per_idea", 2),
        ("temperature", 0.8), ("exchange", "ideas"), ("timeout_s", 300.0), ("price_in", 0.0), ("price_out", 0.0),
        ("wait", False)]
    assert strategy_options(args, "hybrid", llm) == {"llm": None, "stall_trials": 64, "library": "auto"}  # rules
    assert strategy_options(args, "rules", llm) == {"library": "auto"}
    assert strategy_options(args, "ansor", llm) == {}


@pytest.mark.parametrize("options, message", [
    ({"strategy": "magic"}, "unknown strategy 'magic'"),
    ({"runner": "tcp://x"}, "expected local or rpc://HOST:PORT/KEY"),
    ({"trials": 0}, "--trials must be at least 1, got 0"),
    ({"cap_factor": 0.5}, "--cap-factor must be at least 1"),
    ({"min_cap_s": -1.0}, "--min-cap-s must be at least 0, got -1.0"),
    ({"shared_memory": "lots"}, "bad --shared-memory 'lots': use stock | max | KB"),
])
def test_bad_tuning_options_are_refused_when_built(options, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        Tuning(**options)
    with pytest.raises(UserError, match="--repeats must be at least 1, got 0"):
        Evaluation(repeats=0)


def test_the_cap_reaches_the_runner_processes(monkeypatch):
    monkeypatch.setattr(os, "environ", dict(os.environ))  # share_cap writes the environment: keep ours
    measure.share_cap(2.5, 0.0)
    p = subprocess.run([sys.executable, "-c", "import schedsearch.measure as m; print(m.CAP_FACTOR, m.MIN_CAP_S)"],
                       capture_output=True, text=True, cwd=ROOT, env=os.environ, timeout=300)
    assert p.stdout.split() == ["2.5", "0.0"], p.stderr[-2000:]
