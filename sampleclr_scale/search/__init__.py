"""Donor search: the atlas donors nearest to query donors, through an index saved beside
the atlas's embeddings (``sampleclr-scale search``)."""

from sampleclr_scale.search.index import IndexSettings, build_index, open_index
from sampleclr_scale.search.query import SearchResult, check_same_model, search_donors

__all__ = ["IndexSettings", "SearchResult", "build_index", "check_same_model", "open_index",
           "search_donors"]
