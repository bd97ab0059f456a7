"""Saving and exporting from the playground: Save JSON where the CLI would write, CSV and standalone HTML
beside it, and the CLI command for the current settings."""

from __future__ import annotations

import html
from pathlib import Path

from chunky_utils.comparison_html import side_by_side_html, vector_caption
from chunky_utils.data import safe_label
from chunky_utils.errors import UsageError
from chunky_utils.html_blocks import standalone_html
from chunky_utils.notebook.command_line import cli_command
from chunky_utils.pipeline import ExistingResultError, RunRecord, result_path_for
from chunky_utils.tables import export_frame


class PlaygroundSaving:
    """Save JSON, Export CSV / HTML and the CLI command. (A mixin of `SteeringPlayground`.)"""

    def save_path(self) -> Path:
        """Where Save JSON writes: the seed's layout, decoding settings in the name when not the defaults,
        and the 'save as' name when one is given."""
        if self.last_record is None:
            raise UsageError("nothing generated yet: press Generate first")
        path = result_path_for(self.last_record.config, decoding_in_name=True)
        name = self.save_name.value.strip()
        return path.with_name(f"{path.stem}_{safe_label(name)}.json") if name else path

    def save_results(self) -> Path:
        """Write the payload on screen, as it is, with the settings it was made with."""
        path = self.save_path()
        assert self.last_record is not None
        record = RunRecord(self.last_record.config, self.last_payload or self.last_record.payload)
        try:
            self.saved_path = self.runner.save(record, overwrite=bool(self.overwrite_toggle.value), path=path)
        except ExistingResultError as exc:
            raise UsageError(f"{exc}: tick 'overwrite' or type a name under 'save as'") from None
        return self.saved_path

    def export(self, kind: str) -> Path:
        """The table on screen as CSV (one row per prompt, texts, collapse reasons, metrics) or as a
        standalone HTML page, beside where Save JSON writes."""
        if self.last_payload is None:
            raise UsageError("nothing generated yet: press Generate first")
        path = self.save_path().with_suffix(f".{kind}")
        path.parent.mkdir(parents=True, exist_ok=True)
        from chunky_utils.cache import atomic_write_text

        if kind == "csv":
            atomic_write_text(path, export_frame(self.last_payload).to_csv(index=False))
        elif kind == "html":
            meta = self.last_payload["metadata"]
            body = side_by_side_html(self.last_payload["results"], meta)
            atomic_write_text(path, standalone_html(vector_caption(meta), body))
        else:
            raise UsageError(f"export kind must be csv or html, got {kind!r}")
        self.exported.append(path)
        self.status.value = f"Exported {html.escape(str(path))}"
        return path

    def show_cli_command(self) -> str:
        """The command line for the current settings, in the text box (and a button copying it)."""
        command = cli_command(self.current_config())
        self.cli_text.value = command
        self.copy_html.value = (
            f'<button class="chunky-copy" data-command="{html.escape(command)}" '
            "onclick=\"navigator.clipboard.writeText(this.dataset.command).then(() => this.innerText = 'copied')\">"
            "copy to clipboard</button>"
        )
        return command
