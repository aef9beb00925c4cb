"""transformers' `HfArgumentParser` and argparse internals (transformers 5.25, Python 3.10-3.13's argparse), and
review on each bump."""

import dataclasses
import typing

from trl import TrlParser


class GroupedParser(TrlParser):
    """`TrlParser` whose dataclass fields go to argument groups `group_title(dtype, field_name)` names, the groups
    listed in `group_order` (argparse's own groups first, untitled or unknown ones too)."""

    group_order: tuple[str, ...] = ()

    def group_title(self, dtype, field_name: str) -> str:
        raise NotImplementedError

    def order_groups(self) -> None:
        rank = {title: i for i, title in enumerate(self.group_order)}
        self._action_groups.sort(key=lambda group: rank.get(group.title, -1))

    def _add_dataclass_arguments(self, dtype):
        # HfArgumentParser's loop, with each field sent to its group.
        hints = typing.get_type_hints(dtype)
        for spec in dataclasses.fields(dtype):
            if spec.init:
                spec.type = hints[spec.name]
                self._parse_dataclass_field(self._group(self.group_title(dtype, spec.name)), spec)

    def _group(self, title: str):
        for group in self._action_groups:
            if group.title == title:
                return group
        return self.add_argument_group(title)
