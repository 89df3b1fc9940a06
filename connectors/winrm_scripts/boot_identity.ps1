# Prints when this Windows host last booted, and what it is, as one line of JSON.
# LastBootUpTime is the host's boot identity: reboot gates compare it before and after.
$ErrorActionPreference = 'Stop'
$os = Get-CimInstance -ClassName Win32_OperatingSystem
[ordered]@{
    last_boot_up_time = $os.LastBootUpTime.ToUniversalTime().ToString('o')
    caption           = $os.Caption
    version           = $os.Version
    computer_name     = $env:COMPUTERNAME
} | ConvertTo-Json -Compress
