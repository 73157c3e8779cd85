from django.db import models


class Author(models.Model):
    name = models.CharField(max_length=100)
    email = models.EmailField(blank=True)

    def __str__(self) -> str:
        return self.name


class Tag(models.Model):
    name = models.CharField(max_length=50)

    def __str__(self) -> str:
        return self.name


class Article(models.Model):
    title = models.CharField(max_length=200)
    body = models.TextField()
    price = models.DecimalField(max_digits=8, decimal_places=2, default=0)
    published = models.DateTimeField(null=True)
    day = models.DateField(null=True)
    author = models.ForeignKey(Author, related_name="articles", on_delete=models.CASCADE)
    tags = models.ManyToManyField(Tag, related_name="articles", blank=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.title

    def shout(self) -> str:
        return self.title.upper()


def _broken(self):
    # ObjectDoesNotExist has silent_variable_failure: templates render it as empty.
    raise Author.DoesNotExist("no such author")


Article.broken = _broken
