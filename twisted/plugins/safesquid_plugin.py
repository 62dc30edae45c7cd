from twisted.application.service import ServiceMaker

safesquid = ServiceMaker(
    "safesquid",
    "safesquid_tw.tap",
    "safesquid-tw secure web gateway node (standalone, master or slave)",
    "safesquid",
)
