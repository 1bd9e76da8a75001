"""Embedding troupe in an asyncio application, with a store that outlives the process.

    python examples/asyncio_app.py [MODEL] [STORE]

Run it twice with the same STORE: the second run continues every agent's conversation,
and its first turn reuses the cache restored from disk.
"""

import asyncio
import sys

import troupe


async def main(model: str, store: str) -> None:
    async with troupe.open_runtime(model=model, store=store) as rt:
        if "narrator" in rt.agent_ids():
            narrator = await rt.get("narrator")
            print(f"continuing: {len(narrator.transcript())} messages on record")
        else:
            narrator = await rt.spawn("narrator", system="You narrate a story, briefly.")
        critics = []
        for name in ("critic-1", "critic-2"):
            critics.append(await rt.get(name) if name in rt.agent_ids()
                           else await rt.spawn(name, system="You critique stories."))
        story = await narrator.say("Continue the story.", max_tokens=24)
        reviews = await asyncio.gather(
            *(c.say(f"Review this: {story.text}", max_tokens=16) for c in critics)
        )
        print(f"narrator reused {story.cached_tokens} cached tokens")
        for critic, review in zip(critics, reviews, strict=True):
            print(f"{critic.id}: {len(review.tokens)} tokens")
        print(rt.statistics())


if __name__ == "__main__":
    asyncio.run(main(
        sys.argv[1] if len(sys.argv) > 1 else "embedded",
        sys.argv[2] if len(sys.argv) > 2 else "troupe-store",
    ))
