"""Serving a runtime over HTTP inside an asyncio application, and calling it with the
official openai and anthropic clients, the way other tools would.

    pip install 'troupe[serve]' openai anthropic
    python examples/http_server.py [MODEL]

A Python agent and the HTTP clients share one model, one batch and one cache: the second
request resends the first conversation and prefills only what is new.
"""

import asyncio
import sys

import anthropic
import anyio
import openai

import troupe

KEY = "example-key"


async def main(model: str) -> None:
    async with troupe.open_runtime(model=model) as rt:
        await serve_and_call(rt)


async def serve_and_call(rt: troupe.Runtime) -> None:
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        # start() hands back the URL once it listens (port 0: a free port).
        url = await tg.start(lambda task_status: troupe.serve(
            rt, port=0, options=troupe.ServeOptions(api_keys=[KEY]), shutdown=stop,
            task_status=task_status))
        print(f"serving {rt.model.name} on {url}")
        oai = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY)
        history = [{"role": "system", "content": "You tell a long story, one line a turn. " * 8},
                   {"role": "user", "content": "Begin."}]
        first = await oai.chat.completions.create(
            model=rt.model.name, messages=history, max_tokens=16, temperature=0)
        history += [{"role": "assistant", "content": first.choices[0].message.content or ""},
                    {"role": "user", "content": "Go on."}]
        second = await oai.chat.completions.create(
            model=rt.model.name, messages=history, max_tokens=16, temperature=0)
        assert second.usage is not None
        assert second.usage.prompt_tokens_details is not None
        print(f"openai: resent {second.usage.prompt_tokens} prompt tokens, "
              f"{second.usage.prompt_tokens_details.cached_tokens} read from cache")
        claude = anthropic.AsyncAnthropic(base_url=url, api_key=KEY)
        async with claude.messages.stream(
                model=rt.model.name, max_tokens=8, system="Be brief.",
                messages=[{"role": "user", "content": "Hello."}]) as stream:
            text = "".join([delta async for delta in stream.text_stream])
        print(f"anthropic: streamed {len(text)} characters")
        await oai.close()
        await claude.close()
        stop.set()  # the server stops once requests in flight are done


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "embedded"))
