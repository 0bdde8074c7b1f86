#!/bin/sh
# Create Motorcade's Temporal namespace once (compose service temporal-namespace, image
# temporalio/admin-tools). The worker registers its search attributes itself at start.
set -eu
: "${TEMPORAL_ADDRESS:?}" "${NAMESPACE:=default}" "${RETENTION:=30d}"

tries=0
until temporal operator cluster health --address "${TEMPORAL_ADDRESS}"; do
  tries=$((tries + 1))
  [ "$tries" -lt 30 ] || { echo "Temporal is not healthy"; exit 1; }
  sleep 2
done

if temporal operator namespace describe --namespace "${NAMESPACE}" --address "${TEMPORAL_ADDRESS}" >/dev/null 2>&1; then
  echo "namespace ${NAMESPACE} exists"
else
  temporal operator namespace create --namespace "${NAMESPACE}" --retention "${RETENTION}" \
    --address "${TEMPORAL_ADDRESS}"
  echo "namespace ${NAMESPACE} created (retention ${RETENTION})"
fi
