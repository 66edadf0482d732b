"""What a proposal does: actions from a TOML file to calldata, and calldata back to words.

A proposal file names each action's contract by its name in the deployment
(or gives a ``target`` address), its function by signature and its arguments
as TOML values::

    description = "Raise the marketplace fee to 5 %"

    [[actions]]
    contract = "ModelMarketplace"
    function = "setParameters(uint16,uint16,uint16,address)"
    args = [500, 4000, 3000, "JoyTimelock"]   # an address may be a contract's name
    value = 0                                 # wei sent with the call (default 0)

Integers may be strings ("1000000000000000000000", "0x10"), as TOML integers
stop at 2^63. A named contract's function must be in its ABI, so a typo fails
here and not at execution. ``describe`` turns an action back into words
(``ModelMarketplace.setParameters(feeBps=500, ..., treasury=0x... (JoyTimelock))``)
whatever it holds: calldata that is not one of our functions, or not even
ABI, is described as such, never raised.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_abi.exceptions import ABITypeError, EncodingError, ParseError
from eth_abi.grammar import ABIType, BasicType, TupleType, parse
from eth_utils.crypto import keccak
from web3 import Web3

from joynode.control.methods import describe_errors

MAX_ACTIONS = 10
SIGNATURE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\((.*)\)$")
LONG_BYTES = 32  # bytes values longer than this are shown cut, with their length


class ProposalError(ValueError):
    """A proposal that cannot be made as written; the message says where and why."""


class ActionSpec(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    contract: str | None = pydantic.Field(None, max_length=64, description="a deployment name")
    target: str | None = pydantic.Field(None, description="an address outside the deployment")
    function: str = pydantic.Field(
        "", max_length=512, description='e.g. "transfer(address,uint256)"'
    )
    args: list[Any] = pydantic.Field(default_factory=list, max_length=32)
    value: int | str = pydantic.Field(0, description="wei sent with the call")

    @pydantic.model_validator(mode="after")
    def _one_target(self) -> ActionSpec:
        if (self.contract is None) == (self.target is None):
            raise ValueError("give either contract (a name in the deployment) or target")
        if not self.function and self.args:
            raise ValueError("args without a function")
        return self


class ProposalSpec(pydantic.BaseModel):
    """A proposal as written in its TOML file (or sent as ``gov.propose``'s params)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    description: str = pydantic.Field(min_length=1, max_length=20_000)
    actions: list[ActionSpec] = pydantic.Field(min_length=1, max_length=MAX_ACTIONS)


def read_proposal_file(path: Path) -> ProposalSpec:
    """A proposal TOML file, checked; ``ProposalError`` naming the file and what is wrong."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProposalError(f"{path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProposalError(f"{path}: not TOML: {exc}") from None
    try:
        return ProposalSpec.model_validate(document)
    except pydantic.ValidationError as exc:
        raise ProposalError(f"{path}: {describe_errors(exc)}") from None


@dataclass(frozen=True)
class Action:
    target: str
    value: int
    calldata: bytes


class ActionCodec:
    """Actions to calldata and back, against one deployment's addresses and our ABIs."""

    def __init__(self, addresses: Mapping[str, str], abis: Mapping[str, list[dict[str, Any]]]):
        self._addresses = {name: Web3.to_checksum_address(a) for name, a in addresses.items()}
        self._names = {a.lower(): name for name, a in self._addresses.items()}
        self._functions: dict[str, dict[bytes, dict[str, Any]]] = {}
        for name, abi in abis.items():
            self._functions[name] = {
                _selector(_signature(entry)): entry
                for entry in abi
                if entry.get("type") == "function"
            }

    def encode(self, spec: ProposalSpec) -> list[Action]:
        return [self._encode(f"actions[{i}]", a) for i, a in enumerate(spec.actions)]

    def _encode(self, where: str, spec: ActionSpec) -> Action:
        if spec.contract is not None:
            if spec.contract not in self._addresses:
                known = ", ".join(sorted(self._addresses))
                raise ProposalError(f"{where}.contract: no {spec.contract!r} here; one of {known}")
            target = self._addresses[spec.contract]
        else:
            assert spec.target is not None
            if not Web3.is_address(spec.target):
                raise ProposalError(f"{where}.target: not an address: {spec.target!r}")
            target = Web3.to_checksum_address(spec.target)
        value = _integer(f"{where}.value", spec.value)
        if value < 0 or value >= 2**256:
            raise ProposalError(f"{where}.value: out of range")
        if not spec.function:
            return Action(target, value, b"")
        name, types = _parse_signature(f"{where}.function", spec.function)
        if len(spec.args) != len(types):
            raise ProposalError(
                f"{where}.args: {spec.function} takes {len(types)} arguments, got {len(spec.args)}"
            )
        signature = f"{name}({','.join(_type_str(t) for t in types)})"
        contract = self._names.get(target.lower())
        if contract in self._functions and _selector(signature) not in self._functions[contract]:
            alike = sorted(
                _signature(e) for e in self._functions[contract].values() if e["name"] == name
            )
            raise ProposalError(
                f"{where}.function: {contract} has no {signature}"
                + (f"; it has {', '.join(alike)}" if alike else "")
            )
        values = []
        for i, (abi_type, raw) in enumerate(zip(types, spec.args, strict=True)):
            coerced = self._coerce(f"{where}.args[{i}]", abi_type, raw)
            try:
                abi_encode([_type_str(abi_type)], [coerced])
            except (EncodingError, OverflowError, TypeError, ValueError):
                raise ProposalError(
                    f"{where}.args[{i}]: {raw!r} is not a valid {_type_str(abi_type)}"
                ) from None
            values.append(coerced)
        encoded = abi_encode([_type_str(t) for t in types], values)
        return Action(target, value, _selector(signature) + encoded)

    def _coerce(self, where: str, abi_type: ABIType, value: Any) -> Any:
        """A TOML value as eth_abi wants it for ``abi_type`` (names, hex and numbers as text)."""
        if abi_type.is_array:
            if not isinstance(value, list):
                raise ProposalError(f"{where}: {_type_str(abi_type)} needs a list")
            item = abi_type.item_type
            return [self._coerce(f"{where}[{i}]", item, v) for i, v in enumerate(value)]
        if isinstance(abi_type, TupleType):
            if not isinstance(value, list) or len(value) != len(abi_type.components):
                raise ProposalError(
                    f"{where}: {_type_str(abi_type)} needs a list of "
                    f"{len(abi_type.components)} values"
                )
            return tuple(
                self._coerce(f"{where}[{i}]", t, v)
                for i, (t, v) in enumerate(zip(abi_type.components, value, strict=True))
            )
        base = abi_type.base if isinstance(abi_type, BasicType) else ""
        if base in ("uint", "int"):
            return _integer(where, value)
        if base == "address":
            if isinstance(value, str) and value in self._addresses:
                return self._addresses[value]
            if not isinstance(value, str) or not Web3.is_address(value):
                raise ProposalError(f"{where}: not an address or a contract name: {value!r}")
            return Web3.to_checksum_address(value)
        if base == "bool":
            if not isinstance(value, bool):
                raise ProposalError(f"{where}: bool needs true or false")
            return value
        if base == "bytes":
            if not isinstance(value, str) or not re.fullmatch(r"0x([0-9a-fA-F]{2})*", value):
                raise ProposalError(f"{where}: {_type_str(abi_type)} needs hex like 0x12ab")
            return bytes.fromhex(value[2:])
        if base == "string":
            if not isinstance(value, str):
                raise ProposalError(f"{where}: string needs a string")
            return value
        raise ProposalError(f"{where}: type {_type_str(abi_type)} is not supported")

    # ---- back to words

    def contract_name(self, address: str) -> str | None:
        return self._names.get(address.lower())

    def describe(self, target: str, value: int, calldata: bytes) -> str:
        """One action in words; never raises, whatever the calldata holds."""
        name = self.contract_name(target) or target
        sending = f", sending {value} wei" if value else ""
        if not calldata:
            return f"send {value} wei to {name}"
        entry = self._find(self.contract_name(target), calldata[:4])
        if entry is None:
            return (
                f"{name}: call 0x{calldata[:4].hex()} with {max(0, len(calldata) - 4)} bytes "
                f"of arguments (not a function of JoyNet's contracts){sending}"
            )
        types = [_abi_type_str(i) for i in entry["inputs"]]
        try:
            values = abi_decode(types, calldata[4:], strict=False)
        except Exception:  # any malformed calldata: eth_abi raises many kinds
            return (
                f"{name}.{entry['name']}(undecodable arguments: {len(calldata) - 4} bytes){sending}"
            )
        args = ", ".join(
            f"{_arg_name(i, n)}={self._show(v)}"
            for n, (i, v) in enumerate(zip(entry["inputs"], values, strict=True))
        )
        return f"{name}.{entry['name']}({args}){sending}"

    def _find(self, contract: str | None, selector: bytes) -> dict[str, Any] | None:
        """The function ``selector`` calls: the target's own first, else any of our ABIs'."""
        if contract is not None and selector in self._functions.get(contract, {}):
            return self._functions[contract][selector]
        for functions in self._functions.values():
            if selector in functions:
                return functions[selector]
        return None

    def _show(self, value: Any) -> str:
        if isinstance(value, bytes):
            if len(value) > LONG_BYTES:
                return f"0x{value[:LONG_BYTES].hex()}... ({len(value)} bytes)"
            return "0x" + value.hex()
        if isinstance(value, list | tuple):
            inner = ", ".join(self._show(v) for v in value)
            return f"[{inner}]" if isinstance(value, list) else f"({inner})"
        if isinstance(value, str) and Web3.is_address(value):
            address, name = Web3.to_checksum_address(value), self.contract_name(value)
            return f"{address} ({name})" if name else address
        if isinstance(value, str):
            return repr(value)
        return str(value)


def _integer(where: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ProposalError(f"{where}: needs an integer, not {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            return int(text, 16) if text.lower().startswith("0x") else int(text, 10)
        except ValueError:
            pass
    raise ProposalError(f"{where}: needs an integer (or its digits as a string), not {value!r}")


def _parse_signature(where: str, text: str) -> tuple[str, list[ABIType]]:
    match = SIGNATURE.fullmatch(text.replace(" ", ""))
    if match is None:
        raise ProposalError(f"{where}: expected NAME(TYPE,...), e.g. transfer(address,uint256)")
    name, inner = match.groups()
    try:
        parsed = parse(f"({inner})")
        if not isinstance(parsed, TupleType):
            raise ProposalError(f"{where}: cannot read the argument types of {text!r}")
        for component in parsed.components:
            component.validate()
    except (ParseError, ABITypeError) as exc:
        raise ProposalError(f"{where}: {exc}") from None
    return name, list(parsed.components)


def _type_str(abi_type: ABIType) -> str:
    return str(abi_type.to_type_str())  # type: ignore[no-untyped-call]


def _abi_type_str(item: dict[str, Any]) -> str:
    if item["type"].startswith("tuple"):
        inner = ",".join(_abi_type_str(c) for c in item["components"])
        return f"({inner}){item['type'][5:]}"
    return str(item["type"])


def _signature(entry: dict[str, Any]) -> str:
    return f"{entry['name']}({','.join(_abi_type_str(i) for i in entry['inputs'])})"


def _selector(signature: str) -> bytes:
    return bytes(keccak(text=signature))[:4]


def _arg_name(item: dict[str, Any], index: int) -> str:
    """A parameter's name without Solidity's trailing underscore (``feeBps_``); its index
    when it has none."""
    return str(item.get("name") or "").rstrip("_") or f"arg{index}"
