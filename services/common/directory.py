"""The district directory (reference data): streets, sectors, workstations, categories,
departments, members and special supervisors.

A directory is one YAML/JSON document, validated here with messages that name the entry and the
field at fault. Intake stores the loaded versions; other services ask intake for the current one.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.common.validation import one_line

CODE = r"^[a-z0-9][a-z0-9_-]*$"


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class District(_Entry):
    code: str = Field(pattern=r"^[A-Z]{2,6}$")
    name: str = Field(min_length=1)


class Contact(_Entry):
    email: str | None = None
    phone: str | None = None  # a landline is for people; SMS goes to members' and citizens' mobiles
    webhook: str | None = None  # a generic JSON webhook, signed with HMAC-SHA256
    wecom: str | None = None  # 企业微信 group-robot webhook
    dingtalk: str | None = None  # 钉钉 group-robot webhook


class Street(_Entry):
    code: str = Field(pattern=CODE)
    name: str = Field(min_length=1)
    kind: Literal["street", "new_district"] = "street"

    @property
    def short_name(self) -> str:
        return self.name.removesuffix("街道").removesuffix("新区")


class SectorGroup(_Entry):
    code: str = Field(pattern=CODE)
    name: str


class Sector(_Entry):
    code: str = Field(pattern=CODE)
    name: str
    group: str


class Workstation(_Entry):
    code: str = Field(pattern=CODE)
    name: str
    street: str | None = None  # None: the district office's station
    contact: Contact | None = None


class Category(_Entry):
    code: str = Field(pattern=CODE)
    name: str
    keywords: list[str] = []


class Department(_Entry):
    code: str = Field(pattern=CODE)
    name: str
    categories: list[str] = []
    streets: list[str] = ["*"]  # "*": every street
    contact: Contact | None = None


class Member(_Entry):
    id: str = Field(pattern=CODE)
    name: str
    sector: str
    workstation: str | None = None
    phone: str | None = None
    email: str | None = None


class SupervisorPosting(_Entry):
    member: str
    departments: list[str] = Field(min_length=1)


class InspectionOffice(_Entry):
    code: str = Field(pattern=CODE)
    name: str
    contact: Contact | None = None


class Directory(_Entry):
    district: District
    streets: list[Street] = Field(min_length=1)
    sector_groups: list[SectorGroup] = []
    sectors: list[Sector] = []
    workstations: list[Workstation] = []
    categories: list[Category] = Field(min_length=1)
    departments: list[Department] = Field(min_length=1)
    inspection_office: InspectionOffice | None = None
    members: list[Member] = []
    supervisors: list[SupervisorPosting] = []

    @model_validator(mode="after")
    def _references_resolve(self) -> "Directory":
        problems: list[str] = []

        def unique(entries, key, where):
            seen = set()
            for i, entry in enumerate(entries):
                value = getattr(entry, key)
                if value in seen:
                    problems.append(f"{where}[{i}].{key}: duplicate {value!r}")
                seen.add(value)
            return seen

        streets = unique(self.streets, "code", "streets")
        groups = unique(self.sector_groups, "code", "sector_groups")
        sectors = unique(self.sectors, "code", "sectors")
        stations = unique(self.workstations, "code", "workstations")
        categories = unique(self.categories, "code", "categories")
        departments = unique(self.departments, "code", "departments")
        members = unique(self.members, "id", "members")

        def must(value, known, where, what):
            if value not in known:
                problems.append(f"{where}: unknown {what} {value!r}")

        for i, s in enumerate(self.sectors):
            must(s.group, groups, f"sectors[{i}].group", "sector group")
        for i, w in enumerate(self.workstations):
            if w.street is not None:
                must(w.street, streets, f"workstations[{i}].street", "street")
        for i, d in enumerate(self.departments):
            for j, c in enumerate(d.categories):
                must(c, categories, f"departments[{i}].categories[{j}]", "category")
            for j, s in enumerate(d.streets):
                if s != "*":
                    must(s, streets, f"departments[{i}].streets[{j}]", "street")
        for i, m in enumerate(self.members):
            must(m.sector, sectors, f"members[{i}].sector", "sector")
            if m.workstation is not None:
                must(m.workstation, stations, f"members[{i}].workstation", "workstation")
        for i, p in enumerate(self.supervisors):
            must(p.member, members, f"supervisors[{i}].member", "member")
            for j, d in enumerate(p.departments):
                must(d, departments, f"supervisors[{i}].departments[{j}]", "department")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def content_hash(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def resolve_street(self, value: str | None) -> str | None:
        """A street code from its code, full name (平湖街道) or short name (平湖); None if unknown."""
        if not value:
            return None
        value = value.strip()
        for street in self.streets:
            if value in (street.code, street.name, street.short_name):
                return street.code
        return None

    def street_in_text(self, text: str | None) -> str | None:
        """The street named in a free-text address (全称 first, then the short name)."""
        if not text:
            return None
        for street in self.streets:
            if street.name in text:
                return street.code
        for street in self.streets:
            # "龙岗" must not match "龙岗区" (the district), only the street.
            if len(street.short_name) >= 2 and re.search(re.escape(street.short_name) + "(?!区)", text):
                return street.code
        return None

    def resolve_category(self, value: str | None) -> str | None:
        if not value:
            return None
        value = value.strip()
        for category in self.categories:
            if value in (category.code, category.name):
                return category.code
        return None

    def summary(self) -> dict:
        return {
            "district": self.district.name,
            "streets": len(self.streets),
            "sector_groups": len(self.sector_groups),
            "sectors": len(self.sectors),
            "workstations": len(self.workstations),
            "categories": len(self.categories),
            "departments": len(self.departments),
            "members": len(self.members),
            "special_supervisors": len(self.supervisors),
        }


class DirectoryError(ValueError):
    """A directory file that cannot be used; the message names every problem found."""


def parse_directory(document: dict) -> Directory:
    try:
        return Directory.model_validate(document)
    except ValidationError as exc:
        raise DirectoryError(one_line(exc)) from None


def load_directory_file(path) -> Directory:
    try:
        with open(path, encoding="utf-8") as fh:
            document = yaml.safe_load(fh)  # data only: no tags that construct objects
    except OSError as exc:
        raise DirectoryError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise DirectoryError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(document, dict):
        raise DirectoryError(f"{path}: a directory is a mapping with streets, categories, departments, ...")
    try:
        return parse_directory(document)
    except DirectoryError as exc:
        raise DirectoryError(f"{path}: {exc}") from None
