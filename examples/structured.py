"""Typed replies, choices and a tool loop: constrained decoding inside the batch.

    python examples/structured.py                   # the embedded model (random weights)
    python examples/structured.py ~/models/Qwen3-0.6B-4bit   # any local MLX model directory

With a constraint even the embedded model's random weights give valid values.
"""

import sys
from typing import Literal

import attrs
import trio

import troupe


@attrs.frozen
class Move:
    direction: Literal["north", "south", "east", "west"]
    steps: Literal[1, 2, 3]
    shout: bool


def lamp(on: bool) -> str:
    """Switch the lamp on or off."""
    return "the lamp is " + ("on" if on else "off")


async def weather(city: Literal["paris", "rome"]) -> dict[str, str]:
    """Today's weather in a city."""
    return {"city": city, "sky": "clear"}


async def main(model: str) -> None:
    async with troupe.open_runtime(model=model, store=None) as rt:
        scout = await rt.spawn("scout", system="You are a scout. Answer in JSON.")
        judge = await rt.spawn("judge", system="You are a judge.")
        helper = await rt.spawn("helper", system="You use tools.")

        # A typed reply and a choice, in the same batch.
        async with trio.open_nursery() as nursery:
            async def move() -> None:
                reply = await scout.say("Where do we go?", schema=Move, max_tokens=96)
                print(f"scout: {reply.text}  ->  {reply.data!r}")

            async def verdict() -> None:
                reply = await judge.say("Guilty?", choices=["guilty", "innocent"])
                print(f"judge: {reply.data}")

            nursery.start_soon(move)
            nursery.start_soon(verdict)

        # The agent loop: the tools run, their results go back to the model.
        reply = await helper.run("Is it sunny in Rome?", tools=[lamp, weather],
                                 tool_choice="weather", max_steps=4, max_tokens=96)
        for message in helper.transcript():
            print(f"  {message.role}: {message.content[:70]!r}")
        print(f"helper made {sum(m.role == 'tool' for m in helper.transcript())} tool call(s); "
              f"last reply calls {len(reply.tool_calls)}")


if __name__ == "__main__":
    trio.run(main, sys.argv[1] if len(sys.argv) > 1 else "embedded")
