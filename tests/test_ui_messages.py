"""Messages the tabs show are escaped: an error may quote a file name or a prompt, which must show as text."""

from __future__ import annotations

from app.ui.messages import error_html, message_html


def test_messages_are_escaped_and_carry_their_class_and_id():
    hostile = "checkpoint '<img src=x onerror=alert(1)>.safetensors' is damaged & cannot load"
    shown = error_html(ValueError(hostile), "generation_error")
    assert shown.startswith("<p class='gen-error' id='generation_error'>") and shown.endswith("</p>")
    assert "<img" not in shown and "&lt;img src=x onerror=alert(1)&gt;" in shown and "&amp;" in shown
    assert error_html("x", tag="span") == "<span class='gen-error'>x</span>"
    assert message_html("a'b", "train-done", "done", tag="div") == "<div class='train-done' id='done'>a&#x27;b</div>"
