"""A fake PCCS: serves the sample collateral in Intel PCS v4 format (used by conftest.py)."""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from dataclasses import dataclass, field


@dataclass
class FakePccs:
    """Serves /sgx|tdx/certification/v4/{pckcrl,tcb,qe/identity,rootcacrl} like a PCCS."""

    collateral: dict[str, dict[str, str]]  # "sgx" / "tdx" -> dcap-qvl collateral JSON
    url: str = ""
    hits: list[str] = field(default_factory=list)
    #: "up", "down" (503 everywhere), "no-rootcacrl", "broken-tcb", "wrong-tcb", "slow"
    mode: str = "up"
    delay: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def paths(self) -> list[str]:
        with self.lock:
            return [urllib.parse.urlsplit(hit).path for hit in self.hits]

    def respond(self, target: str) -> tuple[int, dict[str, str], bytes]:
        with self.lock:
            self.hits.append(target)
        if self.delay:
            time.sleep(self.delay)
        if self.mode == "down":
            return 503, {}, b"service unavailable"
        parts = urllib.parse.urlsplit(target)
        query = dict(urllib.parse.parse_qsl(parts.query))
        segments = parts.path.strip("/").split("/")
        if parts.path == "/IntelSGXRootCA.der":
            return 200, {}, bytes.fromhex(self.collateral["sgx"]["root_ca_crl"])
        if len(segments) < 4 or segments[1:3] != ["certification", "v4"]:
            return 404, {}, b"not found"
        tee, endpoint = segments[0], "/".join(segments[3:])
        by_ca = {"processor": self.collateral["sgx"], "platform": self.collateral["tdx"]}
        if endpoint == "pckcrl" and tee == "sgx" and query.get("ca") in by_ca:
            source = by_ca[query["ca"]]
            body = bytes.fromhex(source["pck_crl"])
            if query.get("encoding") != "der":
                body = source["pck_crl"].encode()
            return 200, {"SGX-PCK-CRL-Issuer-Chain": _q(source["pck_crl_issuer_chain"])}, body
        if endpoint == "rootcacrl" and tee == "sgx" and self.mode != "no-rootcacrl":
            return 200, {}, self.collateral["sgx"]["root_ca_crl"].encode()
        if tee not in self.collateral:
            return 404, {}, b"not found"
        source = self.collateral[tee]
        if endpoint == "tcb":
            if self.mode == "broken-tcb":
                return 200, {"TCB-Info-Issuer-Chain": "x"}, b"<html>oops</html>"
            if self.mode == "wrong-tcb":
                source = self.collateral["tdx" if tee == "sgx" else "sgx"]
            fmspc = json.loads(source["tcb_info"])["fmspc"]
            if query.get("fmspc", "").upper() != fmspc and self.mode != "wrong-tcb":
                return 404, {}, b"no TCB info for this FMSPC"
            body = (
                f'{{"tcbInfo":{source["tcb_info"]},"signature":"{source["tcb_info_signature"]}"}}'
            )
            return (
                200,
                {"TCB-Info-Issuer-Chain": _q(source["tcb_info_issuer_chain"])},
                body.encode(),
            )
        if endpoint == "qe/identity":
            body = (
                f'{{"enclaveIdentity":{source["qe_identity"]},'
                f'"signature":"{source["qe_identity_signature"]}"}}'
            )
            return (
                200,
                {"SGX-Enclave-Identity-Issuer-Chain": _q(source["qe_identity_issuer_chain"])},
                body.encode(),
            )
        return 404, {}, b"not found"


def _q(pem: str) -> str:
    return urllib.parse.quote(pem, safe="")
