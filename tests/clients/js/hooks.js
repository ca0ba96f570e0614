// Drives the gateway's hooks API with bigbluebutton-js, as an application would.
// Usage: node hooks.js <base URL ending in /bigbluebutton> <secret> <callback URL> <meetingID>
// Prints one JSON object: each step's answer as the library parsed it.
'use strict'

const bbb = require('bigbluebutton-js')

async function main() {
  const [host, secret, callbackURL, meetingID] = process.argv.slice(2)
  const api = bbb.api(host, secret)
  const http = bbb.http
  const steps = {}
  steps.created = await http(api.hooks.create(callbackURL, { meetingID, eventID: 'user-joined,meeting-ended' }))
  steps.again = await http(api.hooks.create(callbackURL, { meetingID }))
  steps.global = await http(api.hooks.create(callbackURL))
  steps.listed = await http(api.hooks.list({ meetingID }))
  steps.destroyed = await http(api.hooks.destroy(String(steps.created.hookID)))
  steps.listedAfter = await http(api.hooks.list())
  steps.destroyedAgain = await http(api.hooks.destroy(String(steps.created.hookID)))
  process.stdout.write(JSON.stringify(steps))
}

main().catch((error) => {
  process.stderr.write(`${error.stack || error}\n`)
  process.exit(1)
})
