"""Tasks: the built-ins (Sentiment, Entities, Classify) and :class:`Task` for a user's own pydantic schema."""

from .base import Task, strict_json_schema
from .classify import Classify, DocumentLabels
from .entities import DocumentEntities, Entities, EntitiesAnswer, Entity, EntityMention
from .sentiment import DocumentSentiment, Sentiment, SentimentAnswer

__all__ = [
    "Classify",
    "DocumentEntities",
    "DocumentLabels",
    "DocumentSentiment",
    "Entities",
    "EntitiesAnswer",
    "Entity",
    "EntityMention",
    "Sentiment",
    "SentimentAnswer",
    "Task",
    "strict_json_schema",
]
