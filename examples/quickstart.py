"""The API in a screenful: spawn agents, talk, stream, reuse the cache.

    python examples/quickstart.py                   # the embedded model (random weights)
    python examples/quickstart.py ~/models/Qwen3-0.6B-4bit   # any local MLX model directory
"""

import sys

import trio

import troupe


async def main(model: str) -> None:
    async with troupe.open_runtime(model=model, store=None) as rt:
        alice = await rt.spawn("alice", system="You are Alice, the town baker.")
        bob = await rt.spawn("bob", system="You are Bob, the blacksmith.")

        # Two agents at once: their turns share the scheduler's batch.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(alice.say, "Good morning!")
            nursery.start_soon(bob.say, "Is the forge hot yet?")

        reply = await alice.say("What are you baking today?", max_tokens=32, temperature=0.0)
        print(f"alice: {reply.text!r}")
        print(f"  {reply.prompt_tokens} tokens prefilled, {reply.cached_tokens} reused "
              f"from her cache, finished by {reply.finish_reason}")

        print("bob: ", end="")
        async for delta in bob.stream("And you?", max_tokens=32, temperature=0.7, seed=1):
            print(delta, end="", flush=True)
        print()

        same = await rt.get("alice")
        print(f"alice has {len(same.transcript())} messages")
        print(rt.statistics())


if __name__ == "__main__":
    trio.run(main, sys.argv[1] if len(sys.argv) > 1 else "embedded")
