"""A streamed chat completion (``stream=True``): its chunks joined into the ``chat.completion`` they stand for.

Each chunk (``chat.completion.chunk``) carries a piece of the answer in ``choices[0].delta.content`` (or of a
refusal in ``delta.refusal``); one of the last carries ``finish_reason``, and with ``stream_options.include_usage``
a final chunk with no choices carries ``usage``. :class:`StreamedCompletion` joins them; whether the stream ended
or was cut off is the caller's to say (it alone sees ``[DONE]`` or the connection closing), with
:attr:`StreamedCompletion.finished` to go by.
"""

from __future__ import annotations

from typing import Any

from ..exceptions import MalformedResponseError

__all__ = ["StreamedCompletion"]


class StreamedCompletion:
    """The chunks of one streamed answer, joined as they come (only the first choice, ``index`` 0, is kept).

    Attributes:
        chunks: how many chunks were added.
        finish_reason: the last ``finish_reason`` a chunk gave, or None before any did.
    """

    __slots__ = ("_content", "_id", "_refusal", "_usage", "chunks", "finish_reason")

    def __init__(self) -> None:
        self.chunks = 0
        self.finish_reason: str | None = None
        self._id: str | None = None
        self._content: list[str] = []
        self._refusal: list[str] = []
        self._usage: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        """Whether a chunk has said why the answer ended (a ``finish_reason``): the answer is whole."""
        return self.finish_reason is not None

    def add(self, chunk: Any) -> None:
        """Join one chunk (its decoded JSON).

        Raises:
            MalformedResponseError: the chunk is not a JSON object, or its ``choices`` not a list of them.
        """
        if not isinstance(chunk, dict):
            raise MalformedResponseError(f"a streamed chunk that is not a JSON object: {chunk!r}"[:300])
        choices = chunk.get("choices") or []
        if not isinstance(choices, list):
            raise MalformedResponseError(f"a streamed chunk whose 'choices' is not a list: {chunk!r}"[:300])
        self.chunks += 1
        if self._id is None and chunk.get("id"):
            self._id = str(chunk["id"])
        usage = chunk.get("usage")
        if isinstance(usage, dict):  # the final chunk's (servers that send it on every chunk: the last one)
            self._usage = usage
        for choice in choices:
            if not isinstance(choice, dict):
                raise MalformedResponseError(f"a streamed chunk whose choice is not an object: {chunk!r}"[:300])
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if isinstance(delta, dict):
                if isinstance(delta.get("content"), str):
                    self._content.append(delta["content"])
                if isinstance(delta.get("refusal"), str):
                    self._refusal.append(delta["refusal"])
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])

    def completion(self) -> dict[str, Any]:
        """The ``chat.completion`` the chunks stand for: the content and the refusal joined (None where no chunk
        had any; an empty content beside a refusal is None too), the last ``finish_reason``, the last ``usage``."""
        refusal = "".join(self._refusal) or None
        content: str | None = "".join(self._content)
        if not self._content or (not content and refusal is not None):
            content = None
        return {
            "id": self._id,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": refusal},
                    "finish_reason": self.finish_reason,
                }
            ],
            "usage": self._usage or {},
        }
