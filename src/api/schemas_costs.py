"""Response shapes of a machine's costs and savings (`costs` on GET /api/instances)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Hours(BaseModel):
    running: float = Field(
        description="Hours billed at the full hourly price: running, and hibernating, "
        "waking, pausing, resuming or in error"
    )
    paused: float = Field(description="Hours stopped (vast.ai bills only the disk)")
    hibernated: float = Field(description="Hours with no instance at all")


class TransferPrices(BaseModel):
    upload: float | None = Field(description="USD per GB sent from the instance (vast.ai `inet_up_cost`)")
    download: float | None = Field(description="USD per GB received (vast.ai `inet_down_cost`)")


class MachineCosts(BaseModel):
    hourly_usd: float | None = Field(
        description="Price of the instance rented last (vast.ai `dph_total`); null "
        "when unknown (a host gpusnap did not rent)"
    )
    hours: Hours
    spent_usd: float | None = Field(description="Billed hours at the price in force in each of them")
    saved_usd: float | None = Field(
        description="What the hibernated hours would have cost at the price of the instance hibernating destroyed"
    )
    stored_bytes: int = Field(
        description="What the machine's snapshots occupy in the bucket (store_bytes: a chunk shared by format-2 snapshots counted once)"
    )
    storage_usd_month: float = Field(description="stored_bytes at STORAGE_PRICE_GB_MONTH (GB = 10^9 bytes)")
    transfer_usd_per_gb: TransferPrices | None
    as_of: str
