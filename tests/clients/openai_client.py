"""Drives a running `stevedore serve` with the official `openai` Python package (and parses its
/metrics with the official `prometheus_client` parser when installed).

Usage: openai_client.py BASE_URL EXPECTED_JSON
EXPECTED_JSON: {"model": ..., "prompt": ..., "completion": greedy text for `prompt` (40 tokens),
                "chat": [user message, greedy reply (30 tokens)]}
Prints "ok: ..." lines; exits non-zero (with the assertion) on any difference.
"""
import json
import sys
import urllib.request

import openai


def main():
    base, expected = sys.argv[1], json.loads(sys.argv[2])
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    model = expected["model"]

    assert [m.id for m in client.models.list().data] == [model]
    print("ok: models.list")

    r = client.completions.create(model=model, prompt=expected["prompt"], max_tokens=40, temperature=0)
    assert r.choices[0].text == expected["completion"], (r.choices[0].text, expected["completion"])
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 40, r
    print("ok: completions")

    chunks = client.completions.create(
        model=model, prompt=expected["prompt"], max_tokens=40, temperature=0, stream=True
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected["completion"], (text, expected["completion"])
    print("ok: completions, streamed")

    user, reply = expected["chat"]
    messages = [{"role": "user", "content": user}]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=30, temperature=0)
    assert r.choices[0].message.content == reply, (r.choices[0].message.content, reply)
    assert r.choices[0].message.role == "assistant"
    print("ok: chat.completions")

    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=30, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    parts, usage = [], None
    for c in stream:
        if c.usage is not None:
            usage = c.usage
        if c.choices and c.choices[0].delta.content:
            parts.append(c.choices[0].delta.content)
    assert "".join(parts) == reply, ("".join(parts), reply)
    assert usage is not None and usage.completion_tokens == 30, usage
    print("ok: chat.completions, streamed with usage")

    # The client raises the error class that matches the status, with OpenAI's body.
    try:
        client.chat.completions.create(model=model, messages=messages, temperature=5)
        raise AssertionError("temperature 5 was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.body["param"] == "temperature", e.body
    try:
        client.chat.completions.create(model="no-such-model", messages=messages)
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as e:
        assert e.body["code"] == "model_not_found", e.body
    print("ok: errors")

    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        print("skipped: prometheus_client is not installed; /metrics not parsed by it")
        return
    text = urllib.request.urlopen(base + "/metrics").read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    gen = families["stevedore_generated_tokens"].samples[0].value
    assert gen >= 140, gen
    assert families["stevedore_time_to_first_token_seconds"].type == "histogram"
    print("ok: /metrics parsed by prometheus_client, %d families" % len(families))


if __name__ == "__main__":
    main()
