#ifndef EDGEKEY_CMOSQUITTO_SHIM_H
#define EDGEKEY_CMOSQUITTO_SHIM_H
#include <mosquitto.h>
#include <mqtt_protocol.h>
#endif
