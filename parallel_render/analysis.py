"""What a {% parallel %} block reads, and whether rendering it elsewhere could change the page.

Works on parsed nodelists, once per block: the names the block reads from its context (so
only those travel), what it reads under each (so a request or a model instance travels only
in the parts the block can see), and the reasons it must render inline instead.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from django.template import Node, NodeList
from django.template.base import FilterExpression, Token, TokenType, Variable
from django.template.library import InclusionNode, SimpleNode
from django.template.loader_tags import BlockNode, ExtendsNode, IncludeNode
from django.utils.module_loading import import_string

# Attributes under which Django's tags keep the name of a variable they assign with `as`.
ASSIGNMENT_ATTRS = ("asvar", "target_var", "var_name", "variable", "varname", "variable_name")

# Built-in tags whose output depends on state kept across renders of the same template.
STATEFUL_TAGS = {
    "CycleNode": "{% cycle %} keeps state across the page",
    "IfChangedNode": "{% ifchanged %} keeps state across the page",
    "ResetCycleNode": "{% resetcycle %} changes state kept across the page",
    "DebugNode": "{% debug %} reads the whole context",
}

# Tags around a block that pass its output through unchanged.
TRANSPARENT_ENCLOSING = {
    "django.template.defaulttags.ForNode",
    "django.template.defaulttags.IfNode",
    "django.template.defaulttags.WithNode",
    "django.template.defaulttags.AutoEscapeControlNode",
    "django.template.defaulttags.CommentNode",
    "django.template.defaulttags.VerbatimNode",
    "django.template.loader_tags.BlockNode",
    "django.template.loader_tags.ExtendsNode",
    "django.template.loader_tags.IncludeNode",
    "django.template.library.InclusionNode",
    "django.templatetags.i18n.LanguageNode",
    "django.templatetags.tz.LocalTimeNode",
    "django.templatetags.tz.TimezoneNode",
    "django.templatetags.l10n.LocalizeNode",
    "parallel_render.templatetags.parallel.ParallelNode",
}

# Tags whose nodes hold every variable they read as FilterExpressions on themselves.
_DJANGO_MODULES = ("django.template.", "django.templatetags.", "django.contrib.")


def class_path(obj: Any) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def tag_name(node: Node) -> str:
    token = getattr(node, "token", None)
    if token is not None and token.contents:
        return token.contents.split()[0]
    return type(node).__name__


class Reads:
    """What a block reads of one value: the value itself (`whole`: printed, passed to a filter or
    a tag, iterated, compared, bound to another name), or only the attributes and keys below it.

    `{{ request.COOKIES.theme }}` reads request > COOKIES > theme; `{{ user }}` reads user whole.
    A value read whole may be read anywhere below, so below() answers WHOLE for every name.
    """

    __slots__ = ("children", "whole")

    def __init__(self, whole: bool = False) -> None:
        self.whole = whole
        self.children: dict[str, Reads] = {}

    def add(self, path: tuple[str, ...]) -> None:
        node = self
        for bit in path:
            if node.whole:
                return
            child = node.children.get(bit)
            if child is None:
                child = node.children[bit] = Reads()
            node = child
        node.whole = True
        node.children = {}

    def below(self, name: str) -> Reads | None:
        """What is read under attribute or key `name`; None when the block never reads it."""
        if self.whole:
            return WHOLE
        return self.children.get(name)

    def paths(self, prefix: str) -> list[str]:
        if self.whole:
            return [prefix]
        out: list[str] = []
        for name in sorted(self.children):
            out += self.children[name].paths(f"{prefix}.{name}")
        return out

    def __repr__(self) -> str:
        return f"<Reads {', '.join(self.paths('.')) or '(nothing)'}>"


# The value read whole (shared; never modified: add() on it returns at once).
WHOLE = Reads(whole=True)


@dataclass
class Analysis:
    names: set[str] = field(default_factory=set)
    reasons: list[str] = field(default_factory=list)
    # Per name the block reads: what it reads of it (codec.Encoder sends only that part of a
    # request, and only those fields of a model instance it can see).
    reads: dict[str, Reads] = field(default_factory=dict)
    # Every attribute or key name the block looks up below any variable, whatever the
    # variable (loop variables included): a sensitive field named here keeps the block inline.
    attrs: set[str] = field(default_factory=set)

    def read(self, lookups: tuple[str, ...]) -> None:
        name = lookups[0]
        self.names.add(name)
        reads = self.reads.get(name)
        if reads is None:
            reads = self.reads[name] = Reads()
        reads.add(tuple(lookups[1:]))
        self.attrs.update(lookups[1:])

    def read_paths(self) -> list[str]:
        """What the block reads, as dotted paths (`request.path`, `user` for a whole value)."""
        out: list[str] = []
        for name in sorted(self.names):
            reads = self.reads.get(name)
            out += reads.paths(name) if reads is not None else [name]
        return out

    @property
    def reason(self) -> str | None:
        return self.reasons[0] if self.reasons else None


def analyse(nodelists: list[NodeList], engine: Any, transparent: list[str]) -> Analysis:
    result = Analysis()
    _Walker(result, engine, set(transparent)).walk_lists(nodelists, pushed=False)
    return result


class _Walker:
    def __init__(self, result: Analysis, engine: Any, transparent: set[str]) -> None:
        self.result = result
        self.engine = engine
        self.transparent = transparent
        self.seen_templates: set[str] = set()
        # Inside a template the block includes, {% block %}s belong to that template's own
        # inheritance, which the worker renders whole; they are no reason to stay inline.
        self.in_include = 0

    def reason(self, text: str) -> None:
        if text not in self.result.reasons:
            self.result.reasons.append(text)

    def walk_lists(self, nodelists: list[NodeList], pushed: bool) -> None:
        for nodelist in nodelists:
            for node in nodelist:
                self.node(node, pushed)

    def node(self, node: Node, pushed: bool) -> None:
        cls = type(node)
        name = cls.__name__
        path = class_path(node)
        if name in STATEFUL_TAGS and path.startswith("django."):
            self.reason(STATEFUL_TAGS[name])
        if isinstance(node, BlockNode) and not self.in_include:
            self.reason("contains {% block %}, which template inheritance may replace")
        if isinstance(node, ExtendsNode):
            self.extends(node)
        if name == "CsrfTokenNode" or (isinstance(node, InclusionNode) and self.inclusion_uses_csrf(node)):
            # Django's inclusion tags pass csrf_token on to their template: only a template
            # that renders it needs the token (the master's, masked as it would render it).
            self.result.read(("csrf_token",))
        known = path.startswith(_DJANGO_MODULES) or path.startswith("parallel_render.") or path in self.transparent
        if isinstance(node, (SimpleNode, InclusionNode)):
            if node.takes_context:
                self.reason(f"{{% {tag_name(node)} %}} takes the whole context")
            known = True
        if not known:
            self.reason(
                f"custom tag {{% {tag_name(node)} %}} ({path}) may read any variable; list it in "
                "PARALLEL_RENDER['TRANSPARENT_TAGS'] if it only reads its arguments"
            )
        if not pushed:
            for attr in ASSIGNMENT_ATTRS:
                value = getattr(node, attr, None)
                if isinstance(value, str) and value and name not in STATEFUL_TAGS:
                    self.reason(f"{{% {tag_name(node)} ... as {value} %}} assigns a variable outside the block")
        if isinstance(node, IncludeNode):
            self.include(node, pushed)
        inner_pushed = pushed or name in ("ForNode", "WithNode")
        for key, value in vars(node).items():
            if key in ("token", "origin", "template") and isinstance(node, IncludeNode):
                continue
            if key in ("token", "origin"):
                continue
            self.value(value, inner_pushed, depth=0)

    def include(self, node: IncludeNode, pushed: bool) -> None:
        fe = node.template
        self.value(fe, pushed, 0)
        for value in node.extra_context.values():
            self.value(value, pushed, 0)
        constant = isinstance(fe, FilterExpression) and not isinstance(fe.var, Variable) and not fe.filters
        if not constant:
            self.reason("{% include %} of a template chosen at run time")
            return
        if node.isolated_context:
            return
        self.follow("include", str(fe.var))

    def follow(self, tag: str, name: str) -> None:
        """Walk a template the block will render too, once."""
        if name in self.seen_templates:
            return
        self.seen_templates.add(name)
        try:
            template = self.engine.get_template(name)
        except Exception as exc:  # the serial page would fail the same way; let it, inline
            self.reason(f"{{% {tag} {name!r} %}} cannot be loaded: {exc}")
            return
        self.in_include += 1
        try:
            self.walk_lists([template.nodelist], pushed=True)
        finally:
            self.in_include -= 1

    def extends(self, node: ExtendsNode) -> None:
        """An included template that extends another: the parent's variables are read too."""
        fe = node.parent_name
        if not isinstance(fe, FilterExpression) or isinstance(fe.var, Variable) or fe.filters:
            self.reason("an included template extends a template chosen at run time")
            return
        self.follow("extends", str(fe.var))

    def value(self, value: Any, pushed: bool, depth: int) -> None:
        if depth > 6:
            return
        if isinstance(value, FilterExpression):
            self.filter_expression(value)
        elif isinstance(value, Variable):
            self.variable(value)
        elif isinstance(value, NodeList):
            for node in value:
                self.node(node, pushed)
        elif isinstance(value, Node):
            self.node(value, pushed)
        elif isinstance(value, Token):
            if value.token_type == TokenType.VAR:
                self.result.read((value.contents.split(".")[0].split("|")[0].strip(),))
        elif isinstance(value, (list, tuple)):
            for item in value:
                self.value(item, pushed, depth + 1)
        elif isinstance(value, dict):
            for item in value.values():
                self.value(item, pushed, depth + 1)
        elif type(value).__module__.startswith("django.template") and hasattr(value, "__dict__"):
            # {% if %} conditions: smartif operators and defaulttags.TemplateLiteral.
            for item in vars(value).values():
                self.value(item, pushed, depth + 1)

    def filter_expression(self, fe: FilterExpression) -> None:
        if isinstance(fe.var, Variable):
            self.variable(fe.var)
        for _func, args in fe.filters:
            for lookup, arg in args:
                if lookup and isinstance(arg, Variable):
                    self.variable(arg)

    def variable(self, var: Variable) -> None:
        if var.lookups:
            self.result.read(var.lookups)

    def inclusion_uses_csrf(self, node: InclusionNode) -> bool:
        """Whether an inclusion tag's template may render the csrf_token it is handed.

        Walked once per tag node; anything the walk cannot see through (a template chosen at
        run time, a tag that takes the whole context) counts as using it.
        """
        found = getattr(node, "_parallel_render_csrf", None)
        if found is not None:
            return found
        node._parallel_render_csrf = True  # while walking (a tag whose template uses itself)
        filename = node.filename
        templates: list[Any] = []
        try:
            if isinstance(filename, str):
                templates = [self.engine.get_template(filename)]
            elif hasattr(filename, "nodelist"):
                templates = [filename]
            elif hasattr(getattr(filename, "template", None), "nodelist"):
                templates = [filename.template]
            else:
                templates = [self.engine.get_template(name) for name in filename]
        except Exception:
            return True
        inner = Analysis()
        walker = _Walker(inner, self.engine, self.transparent)
        walker.in_include = 1
        walker.walk_lists([t.nodelist for t in templates], pushed=True)
        found = node._parallel_render_csrf = "csrf_token" in inner.names or bool(inner.reasons)
        return found


def transparent_paths(extra: list[str]) -> frozenset[str]:
    """Built-in transparent tags plus the site's TRANSPARENT_TAGS (read on every block render)."""
    return _transparent_paths(tuple(extra))


@functools.cache
def _transparent_paths(extra: tuple[str, ...]) -> frozenset[str]:
    for dotted in extra:
        import_string(dotted)  # a typo in settings fails loudly here
    return frozenset(TRANSPARENT_ENCLOSING) | frozenset(extra)
