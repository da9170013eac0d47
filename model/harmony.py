"""The harmony chat format that gpt-oss was trained on: render prompts, parse streamed replies.

A conversation is a sequence of messages::

    <|start|>{header}<|message|>{content}<|end|>

where the header is the role (for a tool message: the tool's name), an optional `` to={recipient}``, an
optional ``<|channel|>{channel}`` and an optional content type (`` json`` or `` <|constrain|>json``).
The assistant writes to three channels: ``analysis`` (chain of thought, never shown to the user),
``commentary`` (tool calls) and ``final`` (the answer). A prompt ends with ``<|start|>assistant`` and the
model continues with ``<|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final
<|message|>...<|return|>``.

Two rules that silently break a chat when missed (spec section 3.3, pitfall 8):

* Every text piece is encoded with *ordinary* encoding and the control tokens are inserted as ids, so a
  user typing ``<|end|>`` cannot inject structure.
* ``<|end|>`` only closes one message; sampling stops on ``<|return|>`` or ``<|call|>``. In history the
  final answer is stored with ``<|end|>`` (never ``<|return|>``) and earlier analysis is dropped.

This module is pure Python. It needs a tokenizer with ``encode(text) -> list[int]`` (ordinary text only,
special-token text never becomes a control token) and ``decode(ids) -> str`` for o200k_harmony, e.g.
``model.tokenizer``'s o200k_harmony tokenizer or a thin wrapper over ``tiktoken``'s ``encode_ordinary``.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

# ---------------------------------------------------------------------------------------------------------
# Special token ids of o200k_harmony (spec section 3.1)

STARTOFTEXT = 199998  # <|startoftext|>: HF BOS; harmony rendering never uses it
ENDOFTEXT = 199999  # <|endoftext|>
RETURN = 200002  # <|return|>: the assistant finished its final answer -> stop
CONSTRAIN = 200003  # <|constrain|>: content-type marker inside a header
CHANNEL = 200005  # <|channel|>
START = 200006  # <|start|>
END = 200007  # <|end|>: closes one message; NOT a stop token
MESSAGE = 200008  # <|message|>
CALL = 200012  # <|call|>: the assistant wants a tool call -> stop

#: Every id at or above this one is a control/reserved token in o200k_harmony (ordinary BPE ids are
#: 0..199997). The parser never passes such ids to ``tokenizer.decode``.
FIRST_SPECIAL_ID = 199998

SPECIAL_TOKENS: dict[str, int] = {
    "<|startoftext|>": STARTOFTEXT,
    "<|endoftext|>": ENDOFTEXT,
    "<|return|>": RETURN,
    "<|constrain|>": CONSTRAIN,
    "<|channel|>": CHANNEL,
    "<|start|>": START,
    "<|end|>": END,
    "<|message|>": MESSAGE,
    "<|call|>": CALL,
}
SPECIAL_TOKEN_TEXT: dict[int, str] = {i: s for s, i in SPECIAL_TOKENS.items()}

#: Stop sampling when one of these is produced. ``<|return|>`` and ``<|call|>`` are harmony's own stop
#: tokens (``stop_tokens_for_assistant_actions``). ``<|endoftext|>`` is a safety net: the HF
#: ``generation_config.json`` of gpt-oss also stops on it, and a model that drifts out of the chat format
#: (or a raw-text continuation) ends documents with it. ``<|end|>`` is deliberately absent: it only
#: closes the analysis message, after which the final answer follows.
STOP_IDS: tuple[int, ...] = (RETURN, CALL, ENDOFTEXT)

ReasoningEffort = Literal["low", "medium", "high"]
REASONING_EFFORTS: tuple[str, ...] = ("low", "medium", "high")
DEFAULT_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
VALID_CHANNELS: tuple[str, ...] = ("analysis", "commentary", "final")


class HarmonyTokenizer(Protocol):
    """What this module needs from a tokenizer: o200k_harmony ordinary-text encode and decode."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


# ---------------------------------------------------------------------------------------------------------
# Data model


@dataclass(frozen=True)
class Message:
    """One harmony message.

    ``role`` is ``system``, ``developer``, ``user``, ``assistant`` or, for a tool's answer, the tool's name
    (e.g. ``functions.get_weather``). ``content_type`` is rendered after the channel: ``"json"`` as
    `` json``, ``"<|constrain|>json"`` as a space, the ``<|constrain|>`` control token and ``json``.
    """

    role: str
    content: str
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None


@dataclass(frozen=True)
class SystemOptions:
    """The system message's settings (harmony's ``SystemContent`` without tools).

    ``current_date`` is omitted from the prompt when None (harmony's default); the HF chat template always
    writes today's date, see :meth:`with_today`.
    """

    reasoning_effort: ReasoningEffort = "medium"
    knowledge_cutoff: str = "2024-06"
    current_date: str | None = None
    model_identity: str = DEFAULT_IDENTITY

    def __post_init__(self) -> None:
        if self.reasoning_effort not in REASONING_EFFORTS:
            raise ValueError(
                f"reasoning_effort must be one of {REASONING_EFFORTS}, got {self.reasoning_effort!r}"
            )
        if isinstance(self.current_date, _dt.datetime):
            object.__setattr__(self, "current_date", self.current_date.date().isoformat())
        elif isinstance(self.current_date, _dt.date):
            object.__setattr__(self, "current_date", self.current_date.isoformat())
        if self.current_date is not None:
            try:
                _dt.date.fromisoformat(self.current_date)
            except (TypeError, ValueError):
                raise ValueError(
                    f"current_date must be 'YYYY-MM-DD' (or None to leave it out), got {self.current_date!r}"
                ) from None
            if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", self.current_date):
                raise ValueError(f"current_date must be 'YYYY-MM-DD', got {self.current_date!r}")

    def with_today(self) -> SystemOptions:
        """A copy with ``current_date`` set to today's local date."""
        return SystemOptions(
            reasoning_effort=self.reasoning_effort,
            knowledge_cutoff=self.knowledge_cutoff,
            current_date=_dt.date.today().isoformat(),
            model_identity=self.model_identity,
        )

    def render_text(self) -> str:
        """The system message content, exactly as harmony renders it (spec section 3.3)."""
        lines = [self.model_identity, f"Knowledge cutoff: {self.knowledge_cutoff}"]
        if self.current_date is not None:
            lines.append(f"Current date: {self.current_date}")
        lines += [
            "",
            f"Reasoning: {self.reasoning_effort}",
            "",
            "# Valid channels: analysis, commentary, final. Channel must be included for every message.",
        ]
        return "\n".join(lines)


@dataclass
class Conversation:
    """Messages plus the system/developer settings that open the prompt."""

    messages: list[Message] = field(default_factory=list)
    system: SystemOptions | None = field(default_factory=SystemOptions)
    developer: str | None = None

    def render(self) -> str:
        return render_conversation(self.messages, self.system, self.developer)

    def render_ids(self, tokenizer: HarmonyTokenizer) -> list[int]:
        return render_conversation_ids(tokenizer, self.messages, self.system, self.developer)


# ---------------------------------------------------------------------------------------------------------
# Rendering
#
# Rendering produces a list of segments, each either a control-token id or a piece of text. The string
# form joins the control tokens' text with the pieces; the id form inserts the ids and encodes each
# piece on its own with ordinary encoding, like harmony's `render_text_into`.

_Segment = int | str


def _message_segments(msg: Message) -> list[_Segment]:
    segs: list[_Segment] = [START, msg.role]
    if msg.recipient is not None and msg.recipient != "all":
        segs.append(f" to={msg.recipient}")
    if msg.channel is not None:
        segs += [CHANNEL, msg.channel]
    if msg.content_type is not None:
        marker = SPECIAL_TOKEN_TEXT[CONSTRAIN]
        if msg.content_type.startswith(marker):
            segs += [" ", CONSTRAIN]
            rest = msg.content_type[len(marker) :]
            if rest:
                segs.append(rest)
        else:
            segs.append(f" {msg.content_type}")
    segs += [MESSAGE, msg.content]
    # A stored assistant message always ends with <|end|> (a final answer never keeps its <|return|>);
    # only an assistant tool call addressed to a recipient ends with <|call|>.
    is_tool_call = msg.role == "assistant" and msg.recipient is not None and msg.recipient != "all"
    segs.append(CALL if is_tool_call else END)
    return segs


def drop_earlier_analysis(messages: Sequence[Message]) -> list[Message]:
    """Drop assistant ``analysis`` messages that come before the last ``final`` message.

    The chain of thought of a finished turn is not shown to the model again (harmony docs). Analysis after
    the last final (an ongoing tool-calling turn) is kept. Harmony's Rust renderer applies this only when the
    last assistant message is final and only before the *first* final; for single-turn histories both agree,
    and for longer ones this follows the documented intent.
    """
    last_final = max((i for i, m in enumerate(messages) if m.channel == "final"), default=-1)
    return [m for i, m in enumerate(messages) if not (i < last_final and m.channel == "analysis")]


def _conversation_segments(
    messages: Sequence[Message],
    system: SystemOptions | None,
    developer: str | None,
    drop_analysis: bool,
    next_role: str | None,
) -> list[_Segment]:
    segs: list[_Segment] = []
    if system is not None:
        segs += _message_segments(Message("system", system.render_text()))
    if developer is not None:
        segs += _message_segments(Message("developer", f"# Instructions\n\n{developer}"))
    for msg in drop_earlier_analysis(messages) if drop_analysis else messages:
        segs += _message_segments(msg)
    if next_role is not None:
        segs += [START, next_role]
    return segs


def render_conversation(
    messages: Sequence[Message],
    system: SystemOptions | None = SystemOptions(),
    developer: str | None = None,
    *,
    drop_analysis: bool = True,
    next_role: str | None = "assistant",
) -> str:
    """The prompt as text, ending with ``<|start|>assistant`` (``next_role=None`` leaves that off).

    ``system=None`` omits the system message (e.g. when ``messages`` already start with one);
    ``developer`` adds ``<|start|>developer<|message|># Instructions\\n\\n{developer}<|end|>``.
    Use :func:`render_conversation_ids` for the model input: re-encoding this string would turn user text
    such as ``"<|end|>"`` into control tokens.
    """
    segs = _conversation_segments(messages, system, developer, drop_analysis, next_role)
    return "".join(SPECIAL_TOKEN_TEXT[s] if isinstance(s, int) else s for s in segs)


def render_conversation_ids(
    tokenizer: HarmonyTokenizer,
    messages: Sequence[Message],
    system: SystemOptions | None = SystemOptions(),
    developer: str | None = None,
    *,
    drop_analysis: bool = True,
    next_role: str | None = "assistant",
) -> list[int]:
    """The prompt as token ids: control tokens inserted as ids, every text piece encoded as ordinary text."""
    ids: list[int] = []
    for s in _conversation_segments(messages, system, developer, drop_analysis, next_role):
        if isinstance(s, int):
            ids.append(s)
        elif s:
            ids.extend(tokenizer.encode(s))
    return ids


# ---------------------------------------------------------------------------------------------------------
# Streaming parser


@dataclass(frozen=True)
class MessageStart:
    """The header of a message was read; its content follows."""

    role: str
    channel: str | None
    recipient: str | None = None
    content_type: str | None = None


@dataclass(frozen=True)
class ContentDelta:
    """New content text of the current message (never ends inside a multi-byte character)."""

    channel: str | None
    text: str
    recipient: str | None = None


@dataclass(frozen=True)
class MessageDone:
    """A message is complete.

    ``terminator`` says how it ended: ``"end"``, ``"return"``, ``"call"``, ``"endoftext"``,
    ``"interrupted"`` (a new header began without ``<|end|>``) or ``"eof"`` (the stream ran out, see
    :meth:`HarmonyStreamParser.finish`).
    """

    message: Message
    terminator: str


@dataclass(frozen=True)
class Stop:
    """The model produced a stop token: ``reason`` is ``"return"``, ``"call"`` or ``"endoftext"``."""

    reason: str


Event = MessageStart | ContentDelta | MessageDone | Stop

_STOP_REASON = {RETURN: "return", CALL: "call", ENDOFTEXT: "endoftext"}
_ROLE_NAMES = ("system", "developer", "user", "assistant", "tool")
_TERMINATORS = {END: "end", RETURN: "return", CALL: "call", ENDOFTEXT: "endoftext"}


class HarmonyStreamParser:
    """Turns sampled token ids, one at a time, into message events.

    States: ``"start"`` (between messages, expecting ``<|start|>``), ``"header"`` (reading the role /
    recipient / channel / content type until ``<|message|>``) and ``"content"`` (until ``<|end|>``,
    ``<|return|>`` or ``<|call|>``). The prompt ends with ``<|start|>assistant``, so by default the parser
    starts in ``"header"`` with the role already known; pass ``role=None`` to parse a stream that begins
    with ``<|start|>``.

    Malformed output degrades instead of raising: text where a header should be, a header that runs on
    (a newline in it, or more than ``max_header_tokens`` tokens), or text between messages becomes content
    with ``channel=None``; a header started without ``<|end|>`` closes the current message; unknown or
    misplaced control tokens are ignored. After a :class:`Stop` the parser keeps parsing whatever it is
    fed; the caller normally stops sampling there.

    Text is decoded incrementally: the content ids not yet shown are decoded together and emitted unless
    the text ends in U+FFFD (an incomplete UTF-8 sequence), in which case they are held back until the
    character completes. More than ``_MAX_PENDING`` held tokens cannot be one character, so they are then
    emitted as they decode.
    """

    _MAX_PENDING = 8  # a UTF-8 character is at most 4 bytes, hence at most 4 byte-level tokens

    def __init__(
        self, tokenizer: HarmonyTokenizer, role: str | None = "assistant", max_header_tokens: int = 32
    ) -> None:
        self.tokenizer = tokenizer
        self.max_header_tokens = max_header_tokens
        self.messages: list[Message] = []
        self.stop_reason: str | None = None
        self._reset_header(role)
        self.state = "header" if role is not None else "start"
        # current message (valid in "content" state)
        self._role = role or "assistant"
        self._channel: str | None = None
        self._recipient: str | None = None
        self._content_type: str | None = None
        self._text = ""  # content emitted so far
        self._pending: list[int] = []  # content ids not yet emitted

    # -- public ------------------------------------------------------------------------------------

    @property
    def current_channel(self) -> str | None:
        """Channel of the message whose content is being read (None outside content)."""
        return self._channel if self.state == "content" else None

    def push(self, token_id: int) -> list[Event]:
        """Feed one sampled token id; returns the events it completes (often none)."""
        events: list[Event] = []
        if token_id >= FIRST_SPECIAL_ID:
            self._push_special(token_id, events)
        elif self.state == "content":
            self._pending.append(token_id)
            self._emit_delta(events, final=False)
        else:
            if self.state == "start":  # text between messages: as if `<|start|>assistant` was omitted
                self._reset_header("assistant")
                self.state = "header"
            self._header_ids[-1].append(token_id)
            self._header_count += 1
            self._maybe_degrade_header(events)
        return events

    def push_many(self, token_ids: Iterable[int]) -> list[Event]:
        events: list[Event] = []
        for t in token_ids:
            events += self.push(t)
        return events

    def finish(self) -> list[Event]:
        """End of stream (e.g. max_new_tokens reached): flush held text and close an open message."""
        events: list[Event] = []
        if self.state == "content":
            self._close_message(events, "eof")
        elif self.state == "header" and self._header_has_text():
            self._header_to_content(events)
            self._close_message(events, "eof")
        self.state = "start"
        return events

    # -- header ------------------------------------------------------------------------------------

    def _reset_header(self, known_role: str | None) -> None:
        self._known_role = known_role
        # Text ids grouped by the control token that opened the group: [role part, (CHANNEL, ...), ...]
        self._header_ids: list[list[int]] = [[]]
        self._header_marks: list[int | None] = [None]
        self._header_count = 0

    def _header_has_text(self) -> bool:
        """False for an empty header, or one holding only whitespace (e.g. a newline between messages)."""
        if len(self._header_marks) > 1:
            return True
        return bool(self._header_ids[0]) and bool(self.tokenizer.decode(self._header_ids[0]).strip())

    def _header_parts(self) -> list[tuple[int | None, str]]:
        return [
            (mark, self.tokenizer.decode(ids) if ids else "")
            for mark, ids in zip(self._header_marks, self._header_ids)
        ]

    def _parse_header(self) -> tuple[str, str | None, str | None, str | None]:
        """(role, channel, recipient, content_type) from the header read so far."""
        role = self._known_role
        channel = recipient = content_type = None
        for mark, text in self._header_parts():
            words = text.split()
            if mark == CONSTRAIN:
                content_type = SPECIAL_TOKEN_TEXT[CONSTRAIN] + text.strip()
                continue
            if mark == CHANNEL and words and channel is None and not words[0].startswith("to="):
                channel = words.pop(0)
            for w in words:
                if w.startswith("to="):
                    recipient = w[3:]
                elif mark is None and (role is None or w == role):
                    role = w  # (a repeated, already known role name is harmless)
                elif content_type is None:
                    content_type = w
        return role or "assistant", channel, recipient, content_type

    def _stray_text_before_channel(self) -> bool:
        """With the role already known, the text before ``<|channel|>`` may only be `` to=...``: other
        words (besides a repeated role name) are content the model wrote before any header."""
        if self._known_role is None or len(self._header_marks) > 1 or not self._header_ids[0]:
            return False
        words = self.tokenizer.decode(self._header_ids[0]).split()
        return any(not w.startswith("to=") and w not in _ROLE_NAMES for w in words)

    def _maybe_degrade_header(self, events: list[Event]) -> None:
        """A header that contains a line break or runs long is really content (malformed output)."""
        text = "".join(t for _, t in self._header_parts())
        if text.endswith("\ufffd"):
            return  # wait for the character to complete before deciding
        if ("\n" in text and text.strip()) or self._header_count > self.max_header_tokens:
            self._header_to_content(events)

    def _header_to_content(self, events: list[Event]) -> None:
        """Treat the header text read so far as the start of a channel-less (or best-guess) message."""
        role = self._known_role
        channel = None
        pieces: list[str] = []
        for mark, text in self._header_parts():
            if (mark is None and role is None) or (mark == CHANNEL and channel is None):
                # The first word names the role / channel; the rest is content.
                first, *rest = text.split(None, 1) or [""]
                text = rest[0] if rest else ""
                if mark is None:
                    role = first or None
                else:
                    channel = first or None
            pieces.append(text)
        self._open_message(events, role or "assistant", channel, None, None)
        text = "".join(pieces)
        if text:
            self._text = text
            events.append(ContentDelta(channel, text, None))

    # -- content -----------------------------------------------------------------------------------

    def _open_message(
        self,
        events: list[Event],
        role: str,
        channel: str | None,
        recipient: str | None,
        content_type: str | None,
    ) -> None:
        self.state = "content"
        self._role, self._channel = role, channel
        self._recipient, self._content_type = recipient, content_type
        self._text = ""
        self._pending = []
        events.append(MessageStart(role, channel, recipient, content_type))

    def _emit_delta(self, events: list[Event], final: bool) -> None:
        if not self._pending:
            return
        text = self.tokenizer.decode(self._pending)
        if text.endswith("\ufffd") and not final and len(self._pending) <= self._MAX_PENDING:
            return  # incomplete multi-byte character: wait for its remaining bytes
        self._pending = []
        if text:
            self._text += text
            events.append(ContentDelta(self._channel, text, self._recipient))

    def _close_message(self, events: list[Event], terminator: str) -> None:
        self._emit_delta(events, final=True)
        msg = Message(self._role, self._text, self._channel, self._recipient, self._content_type)
        self.messages.append(msg)
        events.append(MessageDone(msg, terminator))
        self.state = "start"
        self._text = ""

    # -- control tokens ----------------------------------------------------------------------------

    def _push_special(self, tok: int, events: list[Event]) -> None:
        if tok == START:
            if self.state == "content":
                self._close_message(events, "interrupted")
            self._reset_header(None)
            self.state = "header"
        elif tok == CHANNEL:
            if self.state == "content":  # a new header began without <|end|><|start|>: same role
                role = self._role
                self._close_message(events, "interrupted")
                self._reset_header(role)
                self.state = "header"
            elif self.state == "start":  # `<|start|>assistant` omitted
                self._reset_header("assistant")
                self.state = "header"
            elif self._stray_text_before_channel():
                role = self._known_role
                self._header_to_content(events)
                self._close_message(events, "interrupted")
                self._reset_header(role)
                self.state = "header"
            self._header_marks.append(tok)
            self._header_ids.append([])
        elif tok == CONSTRAIN:
            if self.state == "header":
                self._header_marks.append(tok)
                self._header_ids.append([])
            # elsewhere it is misplaced: ignored
        elif tok == MESSAGE:
            if self.state == "header":
                self._open_message(events, *self._parse_header())
            elif self.state == "start":  # message with no header at all
                self._open_message(events, "assistant", None, None, None)
            # <|message|> inside content: ignored
        elif tok in _TERMINATORS:
            if self.state == "content":
                self._close_message(events, _TERMINATORS[tok])
            elif self.state == "header":
                if len(self._header_marks) == 1 and self._header_has_text():
                    # Only plain text where the header should be: it was content without a header.
                    self._header_to_content(events)
                    self._close_message(events, _TERMINATORS[tok])
                elif self._header_has_text():
                    self._open_message(events, *self._parse_header())
                    self._close_message(events, _TERMINATORS[tok])
                self.state = "start"
            if tok in _STOP_REASON:
                self.stop_reason = _STOP_REASON[tok]
                events.append(Stop(self.stop_reason))
        # <|startoftext|> and reserved ids carry no meaning here: ignored


def parse_completion(
    tokenizer: HarmonyTokenizer, ids: Iterable[int], role: str | None = "assistant"
) -> list[Message]:
    """Messages in a sampled completion (the ids after the prompt's ``<|start|>assistant``)."""
    parser = HarmonyStreamParser(tokenizer, role=role)
    parser.push_many(ids)
    parser.finish()
    return parser.messages


def final_text(messages: Sequence[Message]) -> str:
    """What to show the user: the last ``final`` message, else channel-less text (malformed output)."""
    final = final_message(messages)
    return final.content if final is not None else ""


def final_message(messages: Sequence[Message]) -> Message | None:
    """The reply to keep in history, as a ``final`` assistant message (None if there is none).

    Prefers the last ``final`` message; if the model never named a channel, the channel-less assistant
    text is taken as the answer. Analysis and commentary alone give None.
    """
    for m in reversed(messages):
        if m.channel == "final":
            return Message("assistant", m.content, "final")
    loose = [m.content for m in messages if m.channel is None and m.role == "assistant"]
    if loose and "".join(loose).strip():
        return Message("assistant", "".join(loose).strip(), "final")
    return None


# ---------------------------------------------------------------------------------------------------------
# Chat session helper


class HarmonyChat:
    """Chat history for gpt-oss: builds each prompt and keeps only the final answers.

    Usage::

        chat = HarmonyChat(system=SystemOptions(reasoning_effort="low"))
        ids = chat.prompt_ids(tok, "Tell me a story")   # appends the user message
        ... sample until a STOP_IDS token, feeding HarmonyStreamParser ...
        chat.record_reply(parser.messages)               # stores the final answer only
    """

    def __init__(self, system: SystemOptions | None = None, developer: str | None = None) -> None:
        self.system = system if system is not None else SystemOptions()
        self.developer = developer
        self.history: list[Message] = []

    def prompt_ids(
        self,
        tokenizer: HarmonyTokenizer,
        user_text: str,
        system: SystemOptions | None = None,
        developer: str | None = None,
    ) -> list[int]:
        """Append ``user_text`` to the history and return the prompt ids ending with ``<|start|>assistant``.

        ``system``/``developer`` override the session's settings for this and later turns when given.
        """
        if system is not None:
            self.system = system
        if developer is not None:
            self.developer = developer
        self.history.append(Message("user", user_text))
        return render_conversation_ids(tokenizer, self.history, self.system, self.developer)

    def prompt_text(self) -> str:
        """The current prompt as text (for display and debugging)."""
        return render_conversation(self.history, self.system, self.developer)

    def record_reply(self, messages: Sequence[Message]) -> Message | None:
        """Store the reply's final answer (analysis is dropped, as the format requires); returns it.

        Returns None and stores nothing when the reply has no answer (e.g. it was cut off mid-analysis).
        """
        final = final_message(messages)
        if final is not None:
            self.history.append(final)
        return final

    def undo_last_user(self) -> str | None:
        """Remove the trailing user message (e.g. after a failed generation); returns its text."""
        if self.history and self.history[-1].role == "user":
            return self.history.pop().content
        return None

    def reset(self) -> None:
        self.history.clear()
