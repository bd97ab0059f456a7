"""The same run from the command line: the CLI invocation that reproduces a `RunConfig`."""

from __future__ import annotations

from chunky_utils.config import RunConfig

CLI_PROGRAM = "test_tulu_contrastive_steering"
_CLI_SWITCHES = {
    "include_vector_prompts": (True, "--include-vector-prompts"),
    "trust_remote_code": (True, "--trust-remote-code"),
    "overwrite": (True, "--overwrite"),
    "metrics": (False, "--no-metrics"),
    "reuse_baselines": (False, "--no-baseline-cache"),
}
_CLI_SKIPPED = frozenset({"progress"})  # a display setting: -q only quiets the log


def cli_command(config: RunConfig, program: str = CLI_PROGRAM) -> str:
    """The command line that runs `config`: the required flags, then every setting that is not the default."""
    import dataclasses
    import shlex

    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    parts = [program]
    for name in RunConfig.field_names():
        value = getattr(config, name)
        required = defaults[name] is dataclasses.MISSING
        if name in _CLI_SKIPPED or (not required and value == defaults[name]):
            continue
        if name in _CLI_SWITCHES:
            wanted, flag = _CLI_SWITCHES[name]
            if bool(value) == wanted:
                parts.append(flag)
            continue
        if value is None:
            continue
        parts += [f"--{name.replace('_', '-')}", shlex.quote(str(float(value) if name == "scale" else value))]
    return " ".join(parts)
