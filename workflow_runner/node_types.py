"""Reading a V1 node class: its declared inputs (INPUT_TYPES) and which of them are widgets."""

from dataclasses import dataclass, field

# Inputs of these types are widgets in the editor: they hold a value in widgets_values.
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
# What the editor saves after a widget with "control after generate".
CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
SEED_NAMES = frozenset({"seed", "noise_seed"})


@dataclass(frozen=True)
class InputSpec:
    name: str
    type: str  # "COMBO" when INPUT_TYPES gives a list of choices
    section: str  # required | optional | hidden
    options: dict = field(default_factory=dict)
    choices: tuple | None = None  # for COMBO

    @property
    def is_widget(self) -> bool:
        # forceInput turns a widget type into a plain socket (no widgets_values slot).
        return self.type in WIDGET_TYPES and self.section != "hidden" and not (
            self.options.get("forceInput") or self.options.get("defaultInput"))

    @property
    def has_control_value(self) -> bool:
        """The editor saves one extra widgets_values entry (fixed/increment/...) after this one."""
        if not self.is_widget:
            return False
        return bool(self.options.get("control_after_generate")) or (
            self.type == "INT" and self.name in SEED_NAMES)


def declared_inputs(node_class) -> list[InputSpec]:
    """Inputs in declaration order: required, then optional, then hidden."""
    declared = node_class.INPUT_TYPES() or {}
    specs = []
    for section in ("required", "optional", "hidden"):
        for name, decl in (declared.get(section) or {}).items():
            specs.append(_parse_input(name, decl, section))
    return specs


def _parse_input(name, decl, section) -> InputSpec:
    # Hidden inputs are often a bare string ("UNIQUE_ID"); others a (type,) or (type, options).
    if not isinstance(decl, (tuple, list)):
        decl = (decl,)
    kind = decl[0] if decl else "*"
    options = decl[1] if len(decl) > 1 and isinstance(decl[1], dict) else {}
    if isinstance(kind, (list, tuple)):
        return InputSpec(name, "COMBO", section, options, tuple(kind))
    if kind == "COMBO":
        return InputSpec(name, "COMBO", section, options, tuple(options.get("options") or ()))
    return InputSpec(name, str(kind), section, options)


def return_types(node_class) -> list:
    return list(getattr(node_class, "RETURN_TYPES", ()) or ())


def is_output_node(node_class) -> bool:
    return bool(getattr(node_class, "OUTPUT_NODE", False))


def types_match(given, expected) -> bool:
    """Whether an output of type `given` may feed an input of type `expected`.

    "*" matches anything; "A,B" unions match when they share a type; a list (combo choices)
    given as an output type feeds a COMBO input. `not given != expected` keeps the custom-node
    trick of a str subclass whose __ne__ always says False (an "any" type).
    """
    if isinstance(given, (list, tuple)):
        given = "COMBO"
    if isinstance(expected, (list, tuple)):
        expected = "COMBO"
    if not given != expected:
        return True
    if not isinstance(given, str) or not isinstance(expected, str):
        return False
    given_set = {t.strip() for t in given.split(",")}
    expected_set = {t.strip() for t in expected.split(",")}
    return "*" in given_set or "*" in expected_set or bool(given_set & expected_set)
