#ifndef EDGEKEY_CCURL_SHIM_H
#define EDGEKEY_CCURL_SHIM_H
#include <curl/curl.h>
#endif
