"""A small Quora: topics, questions, answers, votes and comments.

Some methods below run a query each time they are called. That is on purpose: the templates
call them inside ``{% parallel %}`` blocks, so the queries run in the worker that renders the
block, in parallel with the other blocks.
"""

from django.conf import settings
from django.db import models
from django.utils import timezone


class Profile(models.Model):
    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="profile")
    credential = models.CharField(max_length=160)
    bio = models.TextField(blank=True)
    avatar_color = models.CharField(max_length=7, default="#b92b27")

    def __str__(self) -> str:
        return f"{self.user.get_username()}: {self.credential}"


class Topic(models.Model):
    name = models.CharField(max_length=80, unique=True)
    slug = models.SlugField(max_length=80, unique=True)
    description = models.TextField(blank=True)
    follower_count = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Question(models.Model):
    title = models.CharField(max_length=255, unique=True)
    body = models.TextField(blank=True)
    author = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="questions")
    topics = models.ManyToManyField(Topic, related_name="questions")
    created_at = models.DateTimeField(default=timezone.now)
    view_count = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.title


class Answer(models.Model):
    question = models.ForeignKey(Question, on_delete=models.CASCADE, related_name="answers")
    author = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="answers")
    body = models.TextField()
    created_at = models.DateTimeField(default=timezone.now)
    view_count = models.PositiveIntegerField(default=0)
    # Sum of the votes' values, kept up to date by seed_demo (for ordering without a join).
    score = models.IntegerField(default=0)

    class Meta:
        ordering = ["-score", "created_at", "id"]
        constraints = [
            models.UniqueConstraint(fields=["question", "author"], name="one_answer_per_author"),
        ]

    def __str__(self) -> str:
        return f"Answer {self.pk} to {self.question_id} by {self.author_id}"

    def upvote_count(self) -> int:
        return self.votes.filter(value=Vote.UP).count()

    def downvote_count(self) -> int:
        return self.votes.filter(value=Vote.DOWN).count()

    def top_upvoters(self) -> list:
        """The first three people who upvoted this answer."""
        votes = self.votes.filter(value=Vote.UP).select_related("user").order_by("id")[:3]
        return [vote.user for vote in votes]

    def recent_comments(self) -> list:
        return list(self.comments.select_related("author").order_by("created_at", "id")[:3])


class Vote(models.Model):
    UP = 1
    DOWN = -1
    VALUES = [(UP, "up"), (DOWN, "down")]

    answer = models.ForeignKey(Answer, on_delete=models.CASCADE, related_name="votes")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="votes")
    value = models.SmallIntegerField(choices=VALUES)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["answer", "user"], name="one_vote_per_user"),
        ]


class Comment(models.Model):
    answer = models.ForeignKey(Answer, on_delete=models.CASCADE, related_name="comments")
    author = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="comments")
    body = models.TextField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at", "id"]
