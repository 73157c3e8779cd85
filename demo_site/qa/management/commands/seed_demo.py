"""Fill the database with deterministic demo data (``random.Random(42)``).

Running it again changes nothing: when the demo questions are already there it only reports
what the database holds. ``--reset`` deletes the demo data first and seeds it again.
"""

import datetime
import random
from dataclasses import dataclass, field

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction
from django.utils.text import slugify

from demo_site.qa.models import Answer, Comment, Profile, Question, Topic, Vote

SEED = 42
N_QUESTIONS = 60
ANSWERS_PER_QUESTION = (12, 16)
EPOCH = datetime.datetime(2023, 1, 2, 9, 0, tzinfo=datetime.timezone.utc)

PEOPLE = [
    ("ada", "Ada", "Lindqvist", "Staff software engineer, 15 years of backend work"),
    ("bram", "Bram", "Okafor", "Physician and former emergency-room resident"),
    ("chen", "Chen", "Wei", "PhD in applied mathematics, University of Toronto"),
    ("dara", "Dara", "Moreau", "Head chef at a small bistro in Lyon"),
    ("emil", "Emil", "Novak", "Amateur astronomer and telescope builder"),
    ("fatima", "Fatima", "Haddad", "History teacher, twenty years in the classroom"),
    ("gus", "Gus", "Halvorsen", "Long-distance cyclist and bike mechanic"),
    ("hana", "Hana", "Sato", "Product designer, previously at two startups"),
    ("ivan", "Ivan", "Petrov", "Database administrator who has seen things"),
    ("jules", "Jules", "Bernard", "Economist at a central bank (views my own)"),
    ("kofi", "Kofi", "Mensah", "Civil engineer working on bridges"),
    ("lena", "Lena", "Fischer", "Violinist and music theory tutor"),
    ("mateo", "Mateo", "Rossi", "Backpacked through 40 countries"),
    ("nia", "Nia", "Williams", "Clinical psychologist"),
    ("omar", "Omar", "Farouk", "Security researcher, occasional CTF player"),
    ("priya", "Priya", "Raman", "Machine learning engineer"),
    ("quinn", "Quinn", "O'Neill", "Writes science fiction; reads everything"),
    ("rosa", "Rosa", "Delgado", "Urban gardener and beekeeper"),
    ("sven", "Sven", "Eriksen", "Retired airline pilot, 22,000 flight hours"),
    ("tamar", "Tamar", "Levi", "Linguist who speaks six languages badly"),
]

AVATAR_COLORS = ["#b92b27", "#2e69ff", "#00897b", "#6a1b9a", "#ef6c00", "#37474f", "#c2185b", "#2e7d32"]

TOPICS = [
    "Python (programming language)",
    "Django",
    "Databases",
    "Distributed Systems",
    "Computer Security",
    "Machine Learning",
    "Mathematics",
    "Physics",
    "Astronomy",
    "History",
    "Economics",
    "Personal Finance",
    "Cooking",
    "Baking",
    "Coffee",
    "Travel",
    "Languages",
    "Linguistics",
    "Music",
    "Classical Music",
    "Psychology",
    "Medicine",
    "Fitness",
    "Cycling",
    "Gardening",
    "Aviation",
    "Architecture",
    "Civil Engineering",
    "Science Fiction",
    "Design",
]

TITLE_TEMPLATES = [
    "What is the best way to learn {t}?",
    "Why do so many beginners find {t} hard?",
    "What are the most common misconceptions about {t}?",
    "How did you get started with {t}?",
    "Is {t} still worth getting into today?",
    "What book changed how you think about {t}?",
    "What do experts in {t} know that most people don't?",
    "How would you explain {t} to a ten-year-old?",
    "What is the most overrated advice about {t}?",
    "What mistakes did you make early on with {t}?",
]

QUESTION_DETAILS = [
    "I have a few hours a week and I would like to use them well.",
    "Every guide I find says something different, so I am asking people who actually do this.",
    "Context: I am switching careers and I would like an honest answer, not marketing.",
    "I tried twice and gave up both times. What am I missing?",
    "Specific examples would help a lot.",
    "",
]

OPENERS = [
    "Short answer: it depends, but less than people think.",
    "I have been doing this for a long time, so let me share what actually worked.",
    "This is a great question, and the honest answer is a bit uncomfortable.",
    "Most answers here focus on the wrong thing.",
    "I used to believe the opposite, so take this as a confession.",
    "Let me answer with a story.",
]

SUBJECTS = [
    "the fundamentals",
    "consistent practice",
    "a good mentor",
    "deliberate feedback",
    "the first year",
    "reading the original sources",
    "building small projects",
    "doing the boring part",
    "a clear goal",
    "patience",
    "careful measurement",
    "curiosity",
]
VERBS = [
    "matter more than",
    "get mistaken for",
    "quietly beat",
    "take longer than",
    "pay off faster than",
    "hide behind",
    "get confused with",
]
OBJECTS = [
    "talent",
    "expensive equipment",
    "the latest tools",
    "motivation",
    "pure theory",
    "raw speed",
    "memorisation",
    "clever tricks",
    "a perfect plan",
    "luck",
]
SENTENCES = [
    "In my experience, {s} and {s2} {v} {o}.",
    "When I started with {t}, I thought {o} mattered most; it did not.",
    "People underestimate how much {s} and {s2} {v} {o}.",
    "The moment it clicked for me was when I stopped chasing {o} and focused on {s}.",
    "If you remember one thing, remember that {s} and {s2} {v} {o}.",
    "A teacher once told me that {s} was the whole game, and I laughed; ten years later I agree.",
    "Nobody talks about {s}, yet it shows up in every corner of {t}.",
    "You will plateau, and that is normal: {s} is what gets you past it.",
    "The research on this is surprisingly consistent, even if the headlines are not.",
    "I have watched dozens of people try, and the ones who succeed share one habit: {s}.",
    "It is not glamorous, but {s} and {s2} {v} {o}.",
    "Be suspicious of anyone who sells you {o} as a shortcut into {t}.",
    "Write things down; your future self will thank you.",
    "Start smaller than you think you should, then double it once it feels easy.",
    "My biggest regret is the years I spent on {o} instead of {s}.",
    "Compare yourself with who you were last month, not with the best people in {t}.",
    "The community around {t} is friendlier than its reputation; ask for help early.",
    "Once you notice how much {s} shapes the result, you cannot unsee it.",
    "Every expert I admire in {t} is obsessive about {s}.",
    "There is no single path, but there are many dead ends, and {o} is one of them.",
]
LIST_ITEMS = [
    "Pick one resource and finish it",
    "Practise a little every day",
    "Find people slightly ahead of you",
    "Teach what you just learned",
    "Keep a log of your mistakes",
    "Revisit the basics every few months",
    "Measure before you optimise",
    "Ask questions early",
    "Rest on purpose",
    "Read other people's work critically",
]
QUOTES = [
    "Amateurs practise until they get it right; professionals practise until they cannot get it wrong.",
    "The best time to start was ten years ago. The second best time is now.",
    "Simple things should be simple, complex things should be possible.",
    "Premature optimisation is the root of all evil.",
]
HEADINGS = ["What I would do today", "The part nobody mentions", "A concrete plan", "Caveats"]
CODE_WORDS = ["select_related", "git bisect", "EXPLAIN ANALYZE", "mise en place", "VO2 max", "ii-V-I"]
COMMENTS = [
    "This is the best answer here. Thank you!",
    "I disagree with the second point, but the rest is spot on.",
    "Saving this for later.",
    "Could you say more about how you found a mentor?",
    "Exactly what I needed to read today.",
    "The story at the start made me laugh, because the same thing happened to me.",
    "Do you have a source for the research you mention?",
    "I tried this for a month and it works. Slowly, but it works.",
]


@dataclass
class Plan:
    users: list = field(default_factory=list)
    topics: list = field(default_factory=list)
    questions: list = field(default_factory=list)


def _decorate(rng: random.Random, sentence: str) -> str:
    """Sprinkle the mini-Markdown the ``markdownish`` filter understands."""
    roll = rng.random()
    words = sentence.split()
    if len(words) < 5 or roll > 0.2:
        return sentence
    i = rng.randrange(1, len(words) - 2)
    if roll < 0.06:
        words[i] = f"**{words[i]} {words[i + 1]}**"
        del words[i + 1]
    elif roll < 0.12:
        words[i] = f"*{words[i]}*"
    else:
        return f"{sentence} (Think `{rng.choice(CODE_WORDS)}`.)"
    return " ".join(words)


def _sentence(rng: random.Random, template: str, topic: str) -> str:
    subject, subject2 = rng.sample(SUBJECTS, 2)
    text = template.format(s=subject, s2=subject2, v=rng.choice(VERBS), o=rng.choice(OBJECTS), t=topic)
    return _decorate(rng, text[0].upper() + text[1:])


def _paragraph(rng: random.Random, topic: str, n: int) -> str:
    return " ".join(_sentence(rng, template, topic) for template in rng.sample(SENTENCES, n))


def _answer_body(rng: random.Random, topic: str) -> str:
    parts = [rng.choice(OPENERS) + " " + _paragraph(rng, topic, rng.randint(3, 5))]
    for _ in range(rng.randint(3, 6)):
        kind = rng.random()
        if kind < 0.15:
            parts.append("## " + rng.choice(HEADINGS))
            parts.append(_paragraph(rng, topic, rng.randint(3, 5)))
        elif kind < 0.32:
            parts.append("\n".join("- " + item for item in rng.sample(LIST_ITEMS, rng.randint(3, 5))))
        elif kind < 0.42:
            parts.append("> " + rng.choice(QUOTES))
        else:
            parts.append(_paragraph(rng, topic, rng.randint(4, 7)))
    parts.append(_paragraph(rng, topic, rng.randint(1, 3)))
    return "\n\n".join(parts)


def build_plan(rng: random.Random) -> Plan:
    """Everything to create, decided up front so the data depends only on the seed."""
    plan = Plan()
    for i, (username, first, last, credential) in enumerate(PEOPLE):
        plan.users.append(
            {
                "username": username,
                "first_name": first,
                "last_name": last,
                "email": f"{username}@example.com",
                "credential": credential,
                "color": AVATAR_COLORS[i % len(AVATAR_COLORS)],
                "bio": f"{first} writes about {', '.join(rng.sample(TOPICS, 3))}.",
            }
        )
    for name in TOPICS:
        plan.topics.append(
            {
                "name": name,
                "slug": slugify(name),
                "description": f"Questions and answers about {name}.",
                "followers": rng.randint(200, 250_000),
            }
        )

    combos = [(template, topic) for topic in TOPICS for template in TITLE_TEMPLATES]
    usernames = [u["username"] for u in plan.users]
    for template, topic in rng.sample(combos, N_QUESTIONS):
        author = rng.choice(usernames)
        others = [t for t in TOPICS if t != topic]
        created = EPOCH + datetime.timedelta(days=rng.randint(0, 700), seconds=rng.randint(0, 86_399))
        answerers = rng.sample([u for u in usernames if u != author], rng.randint(*ANSWERS_PER_QUESTION))
        answers = []
        for answerer in answerers:
            answered = created + datetime.timedelta(hours=rng.randint(1, 24 * 120), minutes=rng.randint(0, 59))
            voters = rng.sample([u for u in usernames if u != answerer], rng.randint(0, 18))
            votes = [(voter, Vote.UP if rng.random() < 0.85 else Vote.DOWN) for voter in voters]
            comments = []
            for _ in range(rng.randint(0, 5)):
                comments.append(
                    {
                        "author": rng.choice(usernames),
                        "body": " ".join(rng.sample(COMMENTS, rng.randint(1, 2))),
                        "created": answered + datetime.timedelta(hours=rng.randint(1, 24 * 30)),
                    }
                )
            answers.append(
                {
                    "author": answerer,
                    "body": _answer_body(rng, topic),
                    "created": answered,
                    "views": rng.randint(50, 90_000),
                    "votes": votes,
                    "comments": comments,
                }
            )
        detail = rng.choice(QUESTION_DETAILS)
        plan.questions.append(
            {
                "title": template.format(t=topic),
                "author": author,
                "body": detail + ("\n\n" + _paragraph(rng, topic, 2) if detail and rng.random() < 0.5 else ""),
                "topics": [topic, *rng.sample(others, rng.randint(1, 3))],
                "created": created,
                "views": rng.randint(100, 500_000),
                "answers": answers,
            }
        )
    return plan


class Command(BaseCommand):
    help = "Fill the database with deterministic demo data (idempotent)."

    def add_arguments(self, parser):
        parser.add_argument("--reset", action="store_true", help="Delete the demo data first, then seed it again.")

    def handle(self, *args, reset: bool = False, **options):
        plan = build_plan(random.Random(SEED))
        User = get_user_model()
        usernames = [u["username"] for u in plan.users]
        if reset:
            with transaction.atomic():
                Question.objects.filter(title__in=[q["title"] for q in plan.questions]).delete()
                Topic.objects.filter(slug__in=[t["slug"] for t in plan.topics]).delete()
                deleted, _ = User.objects.filter(username__in=usernames).delete()
            self.stdout.write(f"Deleted the demo data ({deleted} rows with users).")
        if Question.objects.filter(title=plan.questions[0]["title"]).exists():
            self.stdout.write("Demo data already present; nothing created.")
            self._report("The database holds")
            return
        with transaction.atomic():
            self._create(plan)
        self._report("Created")

    def _create(self, plan: Plan) -> None:
        User = get_user_model()
        users = {}
        for spec in plan.users:
            user, _ = User.objects.get_or_create(
                username=spec["username"],
                defaults={"first_name": spec["first_name"], "last_name": spec["last_name"], "email": spec["email"]},
            )
            if user.has_usable_password() or not user.password:
                user.set_unusable_password()
                user.save(update_fields=["password"])
            Profile.objects.update_or_create(
                user=user,
                defaults={"credential": spec["credential"], "bio": spec["bio"], "avatar_color": spec["color"]},
            )
            users[spec["username"]] = user

        topics = {}
        for spec in plan.topics:
            topic, _ = Topic.objects.update_or_create(
                slug=spec["slug"],
                defaults={
                    "name": spec["name"],
                    "description": spec["description"],
                    "follower_count": spec["followers"],
                },
            )
            topics[spec["name"]] = topic

        questions = Question.objects.bulk_create(
            [
                Question(
                    title=q["title"],
                    body=q["body"],
                    author=users[q["author"]],
                    created_at=q["created"],
                    view_count=q["views"],
                )
                for q in plan.questions
            ]
        )
        Question.topics.through.objects.bulk_create(
            [
                Question.topics.through(question_id=question.pk, topic_id=topics[name].pk)
                for question, q in zip(questions, plan.questions, strict=True)
                for name in q["topics"]
            ]
        )

        answer_specs = [
            (question, a) for question, q in zip(questions, plan.questions, strict=True) for a in q["answers"]
        ]
        answers = Answer.objects.bulk_create(
            [
                Answer(
                    question=question,
                    author=users[a["author"]],
                    body=a["body"],
                    created_at=a["created"],
                    view_count=a["views"],
                    score=sum(value for _, value in a["votes"]),
                )
                for question, a in answer_specs
            ],
            batch_size=500,
        )
        Vote.objects.bulk_create(
            [
                Vote(answer=answer, user=users[voter], value=value)
                for answer, (_, a) in zip(answers, answer_specs, strict=True)
                for voter, value in a["votes"]
            ],
            batch_size=2000,
        )
        Comment.objects.bulk_create(
            [
                Comment(answer=answer, author=users[c["author"]], body=c["body"], created_at=c["created"])
                for answer, (_, a) in zip(answers, answer_specs, strict=True)
                for c in a["comments"]
            ],
            batch_size=2000,
        )

    def _report(self, verb: str) -> None:
        counts = [
            (get_user_model().objects.count(), "users"),
            (Topic.objects.count(), "topics"),
            (Question.objects.count(), "questions"),
            (Answer.objects.count(), "answers"),
            (Vote.objects.count(), "votes"),
            (Comment.objects.count(), "comments"),
        ]
        self.stdout.write(self.style.SUCCESS(f"{verb}: " + ", ".join(f"{n} {what}" for n, what in counts)))
